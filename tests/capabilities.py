"""What this machine's CPU kernels can do, probed once per session, so that a test needing a
capability skips with the reason where it is absent and runs everywhere else."""
import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def cpu_half_unsupported(dtype: torch.dtype):
    """None if this CPU runs ``dtype`` convolutions (a half model, autocast, and the transposed
    convolution that SRD's backward uses); otherwise the reason, for ``pytest.skip``."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 2, 6, 6, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    try:
        y = F.conv2d(x.to(dtype), w.to(dtype), padding=1)                 # a half model
        F.conv_transpose2d(y, w.to(dtype), padding=1)
        with torch.autocast("cpu", dtype=dtype):                         # autocast
            y = F.conv2d(x, w, padding=1)
            F.conv_transpose2d(y, w, padding=1)
    except (RuntimeError, NotImplementedError) as e:
        return f"this CPU cannot run {dtype} convolutions ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def skip_without_cpu_half(dtype: torch.dtype) -> None:
    import pytest
    reason = cpu_half_unsupported(dtype)
    if reason is not None:
        pytest.skip(reason)
