"""Data-parallel runs of ``srd-fx explain`` and ``srd-fx evaluate`` under ``torchrun``.

The same command line runs alone or under torchrun::

    srd-fx explain photos/ --model resnet50 --out maps/
    torchrun --nproc_per_node=4 -m srd_fx explain photos/ --model resnet50 --out maps/

Under torchrun (``WORLD_SIZE`` > 1 in the environment) each process joins a ``torch.distributed``
process group (NCCL on ``cuda:LOCAL_RANK`` when the run uses GPUs, gloo on the CPU otherwise),
takes every ``WORLD_SIZE``-th work item from its ``RANK`` on (:meth:`World.share`: each item exactly
once, no padding), and writes its own outputs.  Rank 0 gathers what must be gathered (the metric
scores of ``evaluate``) with ``torch.distributed`` collectives and writes the tables.  There is
no scheduler here: torchrun starts, watches and stops the processes.

Outputs are written atomically (:func:`atomic_path`: a temporary file in the same folder, renamed
when complete), so a file under its final name is always whole, and every finished item is
logged (:class:`RunState`), so a rerun of the same command skips the finished items and redoes
the others.  :class:`RunState` also refuses to resume an unfinished run with another number of
processes or other settings (:class:`srd_fx.ResumeError`), without touching what is there.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..errors import DistributedError, OutputCollisionError, ResumeError

#: seconds a process waits for the rendezvous (the process group's store) before giving up
DEFAULT_RENDEZVOUS_TIMEOUT = 60.0
#: seconds a collective (barrier, gather) may wait for the slowest rank: a rank may train a model
#: or score a batch more than the others, so this is long
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, its ``device``."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    _group: object = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """``rank 1 of 4`` (empty when alone)."""
        return f"rank {self.rank} of {self.size}" if self.distributed else ""

    def share(self, n: int) -> range:
        """This rank's items of ``range(n)``: every ``size``-th from ``rank`` on, as
        ``DistributedSampler(shuffle=False)`` but without its padding, so that every item is done
        exactly once however ``n`` divides."""
        return range(self.rank, n, self.size)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier(group=self._group)

    def gather(self, obj) -> Optional[list]:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (a download, a training run that fills a cache), the other
        ranks after it, from what rank 0 left behind."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _env_int(name: str) -> int:
    v = os.environ.get(name)
    try:
        return int(v)
    except (TypeError, ValueError):
        raise DistributedError(f"the environment variable {name}={v!r} is not an integer; launch the "
                               "command with torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR "
                               "and MASTER_PORT)") from None


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    return "WORLD_SIZE" in os.environ and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def _device_for(device: Optional[str], local_rank: int, distributed: bool) -> torch.device:
    if not distributed:
        return torch.device(device or "cpu")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise DistributedError(f"LOCAL_RANK {local_rank} has no GPU: this node has {n}; start at most "
                                   f"{n} processes per node (torchrun --nproc_per_node={max(n, 1)}) or run on "
                                   "the CPU (--device cpu)")
        dev = torch.device("cuda", local_rank)
    return dev


def _wait_for_store(addr: str, port: int, timeout: float, who: str) -> None:
    """Poll the rendezvous address until it accepts a connection (fails with a clear message,
    instead of c10d's retries and stack dumps, when nothing is listening)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(left, 2.0))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"{who}: the rendezvous at {addr}:{port} is unreachable ({last}); waited {timeout:g} s. "
                "Check MASTER_ADDR/MASTER_PORT (torchrun --master-addr/--master-port or --rdzv-endpoint), "
                "that rank 0 is running and that the port is open, or raise --dist-timeout.")
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


def init(device: Optional[str] = None, timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT) -> World:
    """The :class:`World` of this process.  Alone: rank 0 of 1 on ``device`` (default cpu), no
    process group.  Under torchrun: joins the process group (``env://``; NCCL when the device is
    a GPU, else gloo) within ``timeout`` seconds, on ``cuda:LOCAL_RANK`` when ``device`` is None or
    ``cuda`` and GPUs are present, else on the CPU.  Raises :class:`srd_fx.DistributedError`."""
    if not launched_distributed():
        return World(device=_device_for(device, 0, False))
    import torch.distributed as dist
    rank, size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={size}; launch the command with torchrun")
    who = f"rank {rank} of {size}"
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise DistributedError(f"{who}: MASTER_ADDR and MASTER_PORT are not set; launch the command with "
                               "torchrun (torchrun --nproc_per_node=N -m srd_fx ...)")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run one process per machine")
    dev = _device_for(device, local_rank, True)
    backend = "nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # rank 0 hosts the store unless torchrun's agent does; every other process connects to it
    if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        _wait_for_store(addr, _env_int("MASTER_PORT"), timeout, who)
    try:
        if not dist.is_initialized():
            kw = {"device_id": dev} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kw)
        group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError) as e:  # c10d's DistError family are RuntimeErrors
        raise DistributedError(f"{who}: could not join the process group at {addr}:{port} within {timeout:g} s "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__}). Are all "
                               f"{size} processes started (torchrun --nnodes/--nproc_per_node)? Raise "
                               "--dist-timeout if some start late.") from None
    return World(rank=rank, size=size, local_rank=local_rank, device=dev, backend=backend, _group=group)


# ----------------------------------------------------------------------------- files ---------------
@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path in ``path``'s folder, with its extension (so that writers that go by the
    extension still work); renamed to ``path`` when the block ends normally, removed otherwise."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def check_collisions(inputs: Sequence[str], outputs: Sequence[Sequence[str]]) -> None:
    """Raise :class:`srd_fx.OutputCollisionError` when two inputs have an output path in common
    (two ranks would then write the same file, and one map would silently replace the other)."""
    owner: Dict[str, str] = {}
    for src, outs in zip(inputs, outputs):
        for o in outs:
            key = os.path.normcase(os.path.abspath(o))
            if key in owner and owner[key] != src:
                raise OutputCollisionError(
                    f"{owner[key]!r} and {src!r} would both be written to {o!r} (the output is named after "
                    "the file name only); rename one of them or explain them into different --out folders. "
                    "Nothing was written.")
            owner[key] = src


class RunState:
    """The record of a run writing into ``folder`` (``folder/.srd_fx/``): ``run-<kind>.json`` holds the
    settings, the number of processes and whether the run finished; ``<kind>-done-rank<R>.jsonl``
    logs each finished item of rank R (one line, written after the item's files are complete).

    Every rank calls :meth:`check` (and a barrier) before rank 0 calls :meth:`begin`."""

    def __init__(self, folder: str, kind: str, settings: dict, world: World):
        self.dir = os.path.join(folder, ".srd_fx")
        self.kind, self.settings, self.world = kind, json.loads(json.dumps(settings, default=str)), world
        self.path = os.path.join(self.dir, f"run-{kind}.json")

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _logs(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.dir, f"{self.kind}-done-rank*.jsonl")))

    def check(self, fresh: bool = False) -> None:
        """Raise :class:`srd_fx.ResumeError` when the folder holds an earlier run this one must not
        resume (unless ``fresh``: then that run's record is discarded and its files are redone)."""
        old = self._read()
        if fresh or old is None:
            return
        folder = os.path.dirname(self.dir)
        if old.get("settings") != self.settings:
            diff = sorted(k for k in set(old.get("settings", {})) | set(self.settings)
                          if old.get("settings", {}).get(k) != self.settings.get(k))
            shown = "; ".join(f"{k}: {old.get('settings', {}).get(k)!r} then, {self.settings.get(k)!r} now"
                              for k in diff[:4])
            raise ResumeError(f"{folder!r} holds the outputs of an earlier {self.kind} run with other settings ({shown}); "
                              "write into another --out folder, or pass --fresh to redo every output there. "
                              "Nothing was overwritten.")
        if not old.get("finished") and old.get("world_size") != self.world.size:
            raise ResumeError(
                f"{folder!r} holds an unfinished {self.kind} run of {old.get('world_size')} process(es); this one "
                f"has {self.world.size}. Resume it with the same number of processes (torchrun "
                f"--nproc_per_node/--nnodes giving {old.get('world_size')} in all), or pass --fresh to start over. "
                "Nothing was overwritten.")

    def begin(self, fresh: bool = False) -> None:
        """Rank 0: record this run (as unfinished); with ``fresh``, forget the earlier one's log."""
        os.makedirs(self.dir, exist_ok=True)
        if fresh:
            for p in self._logs():
                os.remove(p)
        self._write(finished=False)

    def finish(self) -> None:
        """Rank 0, after every rank is done."""
        self._write(finished=True)

    def _write(self, finished: bool) -> None:
        write_text(self.path, json.dumps(dict(kind=self.kind, settings=self.settings, world_size=self.world.size,
                                              finished=finished), indent=1) + "\n")

    def done(self) -> Dict[str, dict]:
        """Item -> its log record, over every rank's log (lines cut by a kill are ignored)."""
        out: Dict[str, dict] = {}
        for p in self._logs():
            with open(p) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and "item" in rec:
                        out[rec["item"]] = rec
        return out

    def log(self, item: str, files: Sequence[str], **extra) -> None:
        """Record ``item`` as finished, with the sizes of its (complete) ``files``."""
        rec = dict(item=item, files={os.path.basename(p): os.path.getsize(p) for p in files}, **extra)
        path = os.path.join(self.dir, f"{self.kind}-done-rank{self.world.rank}.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
        finally:
            os.close(fd)

    @staticmethod
    def complete(rec: Optional[dict], files: Sequence[str]) -> bool:
        """True when ``rec`` logs exactly ``files`` and each is there with the logged size."""
        if not rec or set(rec.get("files", {})) != {os.path.basename(p) for p in files}:
            return False
        return all(os.path.isfile(p) and os.path.getsize(p) == rec["files"][os.path.basename(p)] for p in files)
