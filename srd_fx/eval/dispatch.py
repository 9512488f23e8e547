"""Counting what a call asks of the device: aten ops (kernel launches on a GPU) and
device-to-host synchronisations (each one stalls the stream and prevents CUDA-graph capture).

    with OpCounter() as c:
        explainer(x)
    c.total, c.syncs, c.counts.most_common(10)

The counter is a ``TorchDispatchMode``: it sees every aten op that reaches a kernel, including
the ones autograd runs during a backward pass started inside the block.
"""
from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that copy a device value to the host (``.item()``, ``bool(t)``, ``nonzero`` and
#: ops whose output size depends on the data); each one waits for the device.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero", "aten.masked_select",
    "aten.equal", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_consecutive",
    "aten.unique_dim", "aten.repeat_interleave", "aten.bincount", "aten.histc",
})


def _packet(func) -> str:
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


class OpCounter(TorchDispatchMode):
    """Tallies aten ops by name (``counts``) while active; ``syncs`` counts those in SYNC_OPS
    (``repeat_interleave`` counts only in its tensor-repeats form without ``output_size``)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.sync_counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _packet(func)
        self.counts[name] += 1
        if name in SYNC_OPS and not (name == "aten.repeat_interleave" and (
                not isinstance(args[0], torch.Tensor) or len(args) < 2 or not isinstance(args[1], torch.Tensor)
                or (kwargs or {}).get("output_size") is not None)):
            self.sync_counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_counts.values())


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor memory that ops create while active and that are still alive, and its
    peak (``peak``, above what existed before): every new storage an op returns is counted until
    it is freed (a storage shared by views, or written in place, is counted once).  Independent of
    the allocator and of the machine, so a test can bound it; it does not see memory that a kernel
    allocates and frees inside itself."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def _track(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            key = id(st)
            if key not in self._seen:
                self._seen.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, st.nbytes())
        elif isinstance(t, (tuple, list)):
            for v in t:
                self._track(v)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._track(out)
        return out
