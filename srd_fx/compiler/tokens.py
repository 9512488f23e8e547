"""Read-out of token layers (SPEC §8): a token layer's relevance is ``(B, N)``; its patch tokens
can be viewed as the ``(B, h, w)`` patch grid and its prefix tokens (class, distillation,
register tokens) as ``(B, n_prefix)``; the two together hold the layer's total."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import InputError


def _grid_for(n: int, hw: Optional[Tuple[int, int]]) -> Optional[Tuple[int, Tuple[int, int]]]:
    """(n_prefix, (h, w)) with the fewest prefix tokens whose patch grid has the input's aspect
    ratio (a square grid when the input size is unknown)."""
    H, W = hw if hw is not None else (1, 1)
    for p in range(0, min(n, 64)):
        rest = n - p
        for h in range(1, rest + 1):
            if rest % h == 0 and h * W == (rest // h) * H:
                return p, (h, rest // h)
    return None


def token_grid(relevance: torch.Tensor, explainer=None, *, n_prefix: Optional[int] = None,
               grid: Optional[Tuple[int, int]] = None):
    """Split a token layer's relevance ``(B, N)`` into the patch grid ``(B, h, w)`` and the prefix
    tokens ``(B, n_prefix)``; ``grid.sum() + prefix.sum() == relevance.sum()``.

    The number of prefix tokens comes from ``n_prefix=``, else the model (timm's
    ``num_prefix_tokens``), else the fewest leading tokens that leave a grid with the input's
    aspect ratio; the grid from ``grid=``, else from the remaining tokens.  A map that already
    has a grid (``(B, h, w)``) is returned as it is, with an empty prefix."""
    if relevance.dim() == 3:
        return relevance, relevance.new_zeros(relevance.shape[0], 0)
    if relevance.dim() != 2:
        raise InputError(f"token_grid expects a token layer's relevance (B, N), got {tuple(relevance.shape)}")
    B, N = relevance.shape
    model = getattr(explainer, "model", explainer)
    hw = None
    info = getattr(explainer, "info", None)
    if info is not None:
        s = info.shape(info.input)
        hw = tuple(s[2:4]) if len(s) >= 4 else None
    if n_prefix is None and model is not None and isinstance(getattr(model, "num_prefix_tokens", None), int):
        n_prefix = model.num_prefix_tokens
    if n_prefix is not None and grid is None:
        found = _grid_for(N - n_prefix, hw)
        if found is None or found[0] != 0:
            raise InputError(f"{N - n_prefix} patch tokens do not form a grid with the input's aspect "
                             f"ratio {hw}; pass grid=(h, w)")
        grid = found[1]
    elif n_prefix is None:
        if grid is not None:
            n_prefix = N - grid[0] * grid[1]
        else:
            found = _grid_for(N, hw)
            if found is None:
                raise InputError(f"cannot find a patch grid in {N} tokens; pass n_prefix= and grid=")
            n_prefix, grid = found
    if n_prefix < 0 or n_prefix + grid[0] * grid[1] != N:
        raise InputError(f"{n_prefix} prefix tokens and a {grid} grid do not make {N} tokens")
    return relevance[:, n_prefix:].reshape(B, *grid), relevance[:, :n_prefix]
