"""Global explanation with SRD (paper Appendix A, Fig. 5): *what* a pointwise feature vector encodes
and *what it is made of*.

* :class:`PFVIndex` — every PFV of one layer over a set of images, unit-normalised, searched by
  cosine similarity with torch (CPU or GPU) in chunks of whole images, so that the similarity matrix
  of a search never holds more than ``chunk_size`` columns.  A query PFV is read by its nearest
  neighbours from *other* images, each labelled with its effective receptive field (ERF, Eq. 1–3):
  the neighbours' ERF crops show what the PFV responds to.
* :func:`sub_concepts` — the sharing ratios ``mu^{l->k}_{i->j}`` (Eq. 6) from a PFV ``j`` of layer
  ``k`` to the PFVs ``i`` of the layers that feed its affine block directly ("sub-concepts", Fig. 5
  bottom).  They are read from the SRD backward pass seeded one-hot at ``(k, j)``; where one input
  of the block also reaches another input (a residual block's skip input also feeds the residual
  branch), the relevance that arrives through the other input is subtracted by one more seeded pass
  per input, so what is returned is the one-block share only.  The shares of one PFV sum to 1 over
  all inputs and positions where its norm and receptive field are non-degenerate.
* :func:`explain_pfv` puts both together for one query (ERFs, crops, the share of the prediction
  that reaches the PFV) and :func:`plot_concepts` draws the Fig. 5-style panel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import InputError, NonFiniteError

if TYPE_CHECKING:  # annotations only
    import matplotlib.figure

    import srd_fx

__all__ = ["PFVIndex", "sub_concepts", "explain_pfv", "plot_concepts", "erf_box", "feature_extractor",
           "layer_name", "ConceptExplanation", "PFVView"]

Position = Tuple[int, ...]
Data = Union[torch.Tensor, "torch.utils.data.Dataset"]


# ----------------------------------------------------------------------------- layers ----------
def _ensure_built(explainer, x: torch.Tensor):
    if explainer.graph_module is None:
        explainer.build(x)


def _layer(explainer, layer: str):
    """The analysed activation layer (``srd_fx.compiler.analysis.Layer``) that ``layer`` names."""
    from ..compiler.twin import resolve_layers
    node = resolve_layers(explainer.info, [layer])[layer]
    if node is explainer.info.input:
        raise InputError("the input has no PFVs with an affine block below them: name an activation layer")
    lay = explainer.info.layer_of(node)
    if lay is None:  # resolve_layers only returns activation layers, L and the input
        raise InputError(f"{layer!r} is not an activation layer of the model")
    return lay


def layer_name(explainer: "srd_fx.Explainer", node: fx.Node) -> str:
    """A readable name of a layer node.

    Parameters
    ----------
    explainer
        A built explainer.
    node
        An fx node of its traced model.

    Returns
    -------
    str
        The module's qualified name, ``"input"``, or the fx node name.
    """
    if node is explainer.info.input:
        return "input"
    if node.op == "call_module":
        return str(node.target)
    return node.name


def _key(explainer, node: fx.Node) -> str:
    """The key under which ``explainer.erf/propagate(read=...)`` addresses ``node``."""
    return "input" if node is explainer.info.input else node.name


class _Features(nn.Module):
    """The traced model cut after one node: returns that node's tensor (a PFV map)."""

    def __init__(self, traced: fx.GraphModule, target: fx.Node):
        super().__init__()
        g = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for n in traced.graph.nodes:
            if n.op == "output":
                break
            env[n] = g.node_copy(n, lambda a: env[a])
            if n is target:
                break
        g.output(env[target])
        self.gm = fx.GraphModule(traced, g)

    def forward(self, x):
        return self.gm(x)


def feature_extractor(explainer: "srd_fx.Explainer", layer: str, value: str = "pre") -> nn.Module:
    """A module ``x -> PFV map`` of ``layer``, running the traced model only up to that tensor.

    Parameters
    ----------
    explainer
        A built explainer.
    layer
        An activation layer (module or fx node name, "low", "high").
    value
        ``"pre"``: the pre-activation (the vector SRD decomposes); ``"post"``: the layer's output.

    Returns
    -------
    torch.nn.Module
        ``x -> features`` in the layer's own layout.

    Raises
    ------
    ValueError
        For a ``value`` other than "pre"/"post".
    RuntimeError
        If the explainer is not built yet.
    KeyError
        If ``layer`` is not an activation layer.
    """
    if value not in ("pre", "post"):
        raise ValueError(f"value must be 'pre' (pre-activation PFVs) or 'post', got {value!r}")
    if explainer.info is None:
        raise RuntimeError("the explainer is built on its first call: call it once (or pass "
                           "example_input= to srd_fx.compile) before asking for its features")
    lay = _layer(explainer, layer)
    return _Features(explainer.traced, lay.pre if value == "pre" else lay.node)


def _to_pfvs(explainer, layer: str, value: str, feats: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) or any layout -> (B, *spatial, C) using the layer's channel axis."""
    lay = _layer(explainer, layer)
    node = lay.pre if value == "pre" else lay.node
    cax = explainer.info.caxes(node)
    if len(cax) != 1:
        raise InputError(f"layer {layer!r} has channel axes {cax}; PFV search needs exactly one channel axis")
    return feats.movedim(cax[0], -1)


# ----------------------------------------------------------------------------- data ------------
def _n_items(data: Data) -> int:
    return len(data)


def _item(data: Data, i: int) -> torch.Tensor:
    """Image ``i`` of ``data`` (a (N, C, H, W) tensor, or a Dataset whose item is an image or a
    tuple starting with one)."""
    it = data[i]
    if isinstance(it, (tuple, list)):
        it = it[0]
    if not isinstance(it, torch.Tensor):
        raise InputError(f"item {i} of the data is a {type(it).__name__}; expected an image tensor "
                         "(C, H, W) or a tuple (image, ...)")
    return it


def _batches(data: Data, batch_size: int):
    n = _n_items(data)
    for s in range(0, n, batch_size):
        if isinstance(data, torch.Tensor):
            yield s, data[s:s + batch_size]
        else:
            items = [_item(data, i) for i in range(s, min(n, s + batch_size))]
            for i, t in enumerate(items):
                if t.shape != items[0].shape:
                    raise InputError(f"image {s + i} has shape {tuple(t.shape)} but image {s} has "
                                     f"{tuple(items[0].shape)}: resize all images to one size before indexing")
            yield s, torch.stack(items)


# ----------------------------------------------------------------------------- the index -------
class PFVIndex:
    """Every PFV of one layer over a set of images, for cosine nearest-neighbour search.

    Rows are image-major: row ``r`` is image ``r // P``, position ``r % P`` (row-major over the
    layer's spatial grid ``spatial``, ``P = prod(spatial)``).  ``vectors`` are unit-normalised;
    ``norms`` keeps the original norms (zero-norm PFVs have no direction and are never returned).
    Build one with :meth:`build` (from a model and images) or :meth:`from_features`.

    Parameters
    ----------
    vectors
        (N * P, C) unit PFVs.
    norms
        (N * P,) their original norms.
    spatial
        The layer's spatial grid (e.g. ``(h, w)``).
    layer
        The layer the PFVs come from.
    value
        ``"pre"`` or ``"post"``: pre- or post-activation PFVs.
    labels
        Optional class label per image.

    Raises
    ------
    srd_fx.InputError
        If the shapes do not fit together.
    """

    def __init__(self, vectors: torch.Tensor, norms: torch.Tensor, spatial: Sequence[int],
                 layer: Optional[str] = None, value: str = "pre", labels: Optional[torch.Tensor] = None) -> None:
        P = math.prod(spatial)
        if vectors.dim() != 2 or vectors.shape[0] % P or norms.shape != vectors.shape[:1]:
            raise InputError(f"vectors must be (images * {P}, C) with one norm per row, got "
                             f"{tuple(vectors.shape)} and {tuple(norms.shape)}")
        self.vectors, self.norms = vectors, norms
        self.spatial, self.P = tuple(int(s) for s in spatial), P
        self.layer, self.value = layer, value
        self.labels = labels

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_features(cls, feats: torch.Tensor, *, layer: Optional[str] = None, value: str = "pre",
                      dtype: torch.dtype = torch.float32, device=None, labels=None) -> "PFVIndex":
        """An index of a PFV map.

        Parameters
        ----------
        feats
            (N, *spatial, C) features, channels last.
        layer
            The layer they come from.
        value
            ``"pre"`` or ``"post"``.
        dtype
            The dtype the vectors are stored in.
        device
            Where the vectors are stored (default: where ``feats`` is).
        labels
            Optional class label per image.

        Returns
        -------
        PFVIndex
            The index of the PFVs of ``feats``.

        Raises
        ------
        srd_fx.InputError
            If ``feats`` has fewer than 3 dimensions.
        srd_fx.NonFiniteError
            If a PFV holds NaN/Inf.
        """
        if feats.dim() < 3:
            raise InputError(f"features must be (N, *spatial, C), got {tuple(feats.shape)}")
        spatial = feats.shape[1:-1]
        v = feats.reshape(-1, feats.shape[-1])
        _check_finite(v, "the PFVs")
        n = v.norm(dim=1)
        u = v / torch.where(n > 0, n, torch.ones_like(n))[:, None]
        return cls(u.to(device=device, dtype=dtype), n.to(device=device, dtype=dtype), spatial, layer,
                   value, labels)

    @classmethod
    @torch.no_grad()
    def build(cls, explainer, data: Data, layer: str, *, value: str = "pre",
              transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, batch_size: int = 64,
              dtype: torch.dtype = torch.float32, device=None, labels=None,
              progress: bool = False) -> "PFVIndex":
        """Run the model over ``data`` (a (N, C, H, W) tensor or a Dataset of images / (image, ...)
        tuples, all of one size) up to ``layer`` and index every PFV.

        Only one batch of activations is alive at a time.

        Parameters
        ----------
        explainer
            The explainer of the model (built on the first image if it is not yet).
        data
            A (N, C, H, W) tensor, or a Dataset of images or ``(image, ...)`` tuples, all of one size.
        layer
            The activation layer whose PFVs are indexed.
        value
            ``"pre"`` (default) or ``"post"``-activation PFVs.
        transform
            Maps a batch of raw images to the model's input (e.g. ``srd_fx.eval.data.normalize``).
        batch_size
            Images per forward pass.
        dtype
            The dtype the vectors are stored in.
        device
            Where the vectors are stored (default: the CPU).
        labels
            Optional class label per image.
        progress
            Show a progress bar (tqdm).

        Returns
        -------
        PFVIndex
            The index of every PFV of ``layer`` over ``data``.

        Raises
        ------
        srd_fx.InputError
            If ``data`` is empty or its images differ in size.
        srd_fx.NonFiniteError
            If a PFV holds NaN/Inf.
        """
        if _n_items(data) == 0:
            raise InputError("the data is empty: nothing to index")
        p = next(explainer.model.parameters(), None)
        mdev = p.device if p is not None else torch.device("cpu")
        mdt = p.dtype if p is not None else torch.float32
        first = _item(data, 0)[None].to(mdev, mdt)
        _ensure_built(explainer, transform(first) if transform else first)
        fx_ = feature_extractor(explainer, layer, value)
        vecs, norms, spatial, size = [], [], None, first.shape[1:]
        it = _batches(data, batch_size)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=math.ceil(_n_items(data) / batch_size), desc=f"index {layer}", leave=False)
        for s, xb in it:
            if xb.shape[1:] != size:
                raise InputError(f"image {s}... has shape {tuple(xb.shape[1:])} but the first has "
                                 f"{tuple(size)}: resize all images to one size before indexing")
            xb = xb.to(mdev, mdt)
            f = _to_pfvs(explainer, layer, value, fx_(transform(xb) if transform else xb))
            spatial = f.shape[1:-1]
            v = f.reshape(-1, f.shape[-1])
            _check_finite(v, f"the PFVs of images {s}..{s + len(xb) - 1}")
            n = v.norm(dim=1)
            vecs.append((v / torch.where(n > 0, n, torch.ones_like(n))[:, None]).to(device=device or "cpu",
                                                                                   dtype=dtype))
            norms.append(n.to(device=device or "cpu", dtype=dtype))
        return cls(torch.cat(vecs), torch.cat(norms), spatial, layer, value, labels)

    # -- basic facts -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def n_images(self) -> int:
        """The number of images indexed."""
        return len(self) // self.P

    @property
    def device(self) -> torch.device:
        """Where the vectors are stored."""
        return self.vectors.device

    def row(self, image: int, position: Sequence[int]) -> int:
        """The row of one PFV.

        Parameters
        ----------
        image
            The image's index.
        position
            The PFV's position on the layer's grid.

        Returns
        -------
        int
            Its row in ``vectors``.

        Raises
        ------
        srd_fx.InputError
            If the image or the position is outside the index.
        """
        position = tuple(int(p) for p in position)
        if not 0 <= image < self.n_images:
            raise InputError(f"image {image} is outside the index ({self.n_images} images)")
        if len(position) != len(self.spatial) or any(not 0 <= p < s for p, s in zip(position, self.spatial)):
            raise InputError(f"position {position} is outside the layer's grid {self.spatial}")
        r = 0
        for p, s in zip(position, self.spatial):
            r = r * s + p
        return image * self.P + r

    def locate(self, rows) -> List[Tuple[int, Position]]:
        """The (image, position) of each row.

        Parameters
        ----------
        rows
            Row indices (any shape).

        Returns
        -------
        list of (int, tuple)
            One ``(image, position)`` per row, in order.
        """
        out = []
        for r in torch.as_tensor(rows).reshape(-1).tolist():
            img, q = divmod(int(r), self.P)
            pos = []
            for s in reversed(self.spatial):
                q, p = divmod(q, s)
                pos.append(p)
            out.append((img, tuple(reversed(pos))))
        return out

    def vector(self, image: int, position: Sequence[int]) -> torch.Tensor:
        """The stored PFV (unit vector times its norm).

        Parameters
        ----------
        image, position
            The PFV, as in :meth:`row` (which raises ``srd_fx.InputError`` outside the index).

        Returns
        -------
        torch.Tensor
            (C,) the PFV.
        """
        r = self.row(image, position)
        return self.vectors[r] * self.norms[r]

    # -- search ------------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 5, *, exclude_images=None, distinct_images: bool = False,
               chunk_size: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` PFVs of highest cosine similarity to each query.

        Parameters
        ----------
        queries
            (C,) or (Q, C) query vectors.
        k
            Neighbours per query.
        exclude_images
            An image index per query (or one for all; -1 for none) whose PFVs are skipped: the
            query's own image.
        distinct_images
            At most one PFV (the most similar) per image.
        chunk_size
            PFVs compared at a time (rounded to whole images): bounds the memory of a search to
            Q x chunk_size similarities.

        Returns
        -------
        tuple of torch.Tensor
            ``(similarities, rows)``, each (Q, k) (or (k,) for one query), most similar first; fewer
            than ``k`` candidates give -inf / -1 in the tail.

        Raises
        ------
        srd_fx.InputError
            If the queries' width is not the index's channel count, ``k`` < 1, or a query has zero
            norm.
        """
        q = torch.as_tensor(queries)
        single = q.dim() == 1
        q = q[None] if single else q
        if q.dim() != 2 or q.shape[1] != self.vectors.shape[1]:
            raise InputError(f"queries must be (Q, {self.vectors.shape[1]}) or ({self.vectors.shape[1]},), "
                             f"got {tuple(torch.as_tensor(queries).shape)}")
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        _check_finite(q, "the queries")
        qn = q.norm(dim=1)
        if (qn == 0).any():
            raise InputError(f"queries {torch.nonzero(qn == 0).reshape(-1).tolist()} have zero norm: cosine "
                             "similarity is undefined (use value='pre' PFVs, which are rarely all zero)")
        q = (q / qn[:, None]).to(self.vectors)
        Q = q.shape[0]
        ex = torch.full((Q,), -1, dtype=torch.long) if exclude_images is None else \
            torch.as_tensor(exclude_images, dtype=torch.long).reshape(-1)
        if ex.numel() not in (1, Q):
            raise InputError(f"exclude_images must be one image index or one per query ({Q}), got {ex.numel()}")
        ex = ex.expand(Q)
        ex = ex.to(self.device)
        per = max(1, int(chunk_size) // self.P)  # whole images per chunk
        best_s = torch.full((Q, 0), -math.inf, dtype=q.dtype, device=self.device)
        best_r = torch.full((Q, 0), -1, dtype=torch.long, device=self.device)
        for i0 in range(0, self.n_images, per):
            i1 = min(self.n_images, i0 + per)
            sims = q @ self.vectors[i0 * self.P:i1 * self.P].T                      # (Q, n * P)
            sims = sims.masked_fill(~(self.norms[i0 * self.P:i1 * self.P] > 0)[None], -math.inf)
            sims = sims.view(Q, i1 - i0, self.P)
            imgs = torch.arange(i0, i1, device=self.device)
            sims = sims.masked_fill((imgs[None, :] == ex[:, None])[:, :, None], -math.inf)
            if distinct_images:
                s, p = sims.max(dim=2)                                            # (Q, n)
                rows = imgs[None, :] * self.P + p
            else:
                s = sims.reshape(Q, -1)
                rows = torch.arange(i0 * self.P, i1 * self.P, device=self.device).expand(Q, -1)
            kk = min(k, s.shape[1])
            s, j = s.topk(kk, dim=1)
            best_s = torch.cat([best_s, s], 1)
            best_r = torch.cat([best_r, rows.gather(1, j)], 1)
            kk = min(k, best_s.shape[1])
            best_s, j = best_s.topk(kk, dim=1)
            best_r = best_r.gather(1, j)
        if best_s.shape[1] < k:
            pad = k - best_s.shape[1]
            best_s = torch.cat([best_s, best_s.new_full((Q, pad), -math.inf)], 1)
            best_r = torch.cat([best_r, best_r.new_full((Q, pad), -1)], 1)
        best_r = best_r.masked_fill(torch.isinf(best_s), -1)
        return (best_s[0], best_r[0]) if single else (best_s, best_r)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the index to a file (``torch.save`` of plain tensors and metadata).

        Parameters
        ----------
        path
            The file to write.
        """
        torch.save(dict(vectors=self.vectors.cpu(), norms=self.norms.cpu(), spatial=list(self.spatial),
                        layer=self.layer, value=self.value,
                        labels=None if self.labels is None else torch.as_tensor(self.labels).cpu()), path)

    @classmethod
    def load(cls, path: str, device=None) -> "PFVIndex":
        """Read an index written by :meth:`save`.

        Parameters
        ----------
        path
            The file.
        device
            Where to put the vectors (default: the CPU).

        Returns
        -------
        PFVIndex
            The index.
        """
        d = torch.load(path, map_location=device or "cpu", weights_only=True)
        return cls(d["vectors"], d["norms"], d["spatial"], d["layer"], d["value"], d.get("labels"))


def _check_finite(t: torch.Tensor, what: str):
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"{what} contain NaN or inf: check the model's weights and the inputs")


# ----------------------------------------------------------------------------- sub-concepts ----
@torch.no_grad()
def sub_concepts(explainer: "srd_fx.Explainer", x: torch.Tensor, layer: str, positions=None) -> Dict[str, torch.Tensor]:
    """The sharing ratios from PFVs of ``layer`` to the PFVs of the layers feeding its affine block.

    Returns ``{input layer key: (B, P, h, w)}`` (keys: "input" or the fx name of an activation
    layer, in the block's input order): entry ``[b, p, i]`` is ``mu^{l->k}_{i->j}`` for
    ``j = positions[p]`` (Eq. 6) — the part of PFV ``j`` that PFV ``i`` of layer ``l`` forms
    directly.  For each PFV the entries sum to 1 over all inputs and positions (0 where the PFV's
    norm is below ``eps``; less than 1 where a receptive field has zero norm).

    It is the SRD backward seeded one-hot at ``(layer, j)`` read at the block's inputs; for a block
    whose input ``a`` also reaches another input ``l`` (ResNet: the skip input feeds the residual
    branch), the relevance that arrives at ``l`` through ``a`` is the propagation of ``a``'s share
    and is subtracted, inputs being processed latest first (paths from ``(layer, j)`` leave the
    block through exactly one input, and the backward pass is linear in the seed).

    Parameters
    ----------
    explainer
        The explainer of the model (built on ``x`` if it is not yet).
    x
        The inputs (B, C, H, W).
    layer
        The activation layer of the PFVs ``j``.
    positions
        Positions on the layer's grid (index tuples); default: all.

    Returns
    -------
    dict of str to torch.Tensor
        ``{input layer key: (B, P, h, w)}`` sharing ratios.

    Raises
    ------
    srd_fx.InputError
        For a position outside the layer.
    KeyError
        If ``layer`` is not an activation layer.
    """
    _ensure_built(explainer, x)
    lay = _layer(explainer, layer)
    order = explainer.info.order
    ins = list(lay.inputs)
    keys = [_key(explainer, n) for n in ins]
    total = explainer.erf(x, layer, positions, read=keys)
    B, P = next(iter(total.values())).shape[:2]
    xr = x.repeat_interleave(P, dim=0)
    later_first = sorted(ins, key=order.get, reverse=True)
    direct: Dict[str, torch.Tensor] = {}
    through: Dict[str, torch.Tensor] = {}     # relevance reaching each input via later inputs
    for i, node in enumerate(later_first):
        key = _key(explainer, node)
        d = total[key] - through.get(key, 0)
        direct[key] = d
        rest = [_key(explainer, n) for n in later_first[i + 1:]]
        if rest:
            more = explainer.propagate(xr, key, d.reshape(B * P, *d.shape[2:]), read=rest)
            for r in rest:
                through[r] = through.get(r, 0) + more[r].reshape(B, P, *more[r].shape[1:])
    return {k: direct[k].detach() for k in keys}


# ----------------------------------------------------------------------------- ERF crops -------
def erf_box(erf: torch.Tensor, mass: float = 0.9, min_size: int = 8) -> Tuple[int, int, int, int]:
    """The bounding box ``(top, left, bottom, right)`` (exclusive ends) of the fewest pixels holding
    ``mass`` of the positive ERF mass, grown around its centre to at least ``min_size`` pixels a
    side (clipped to the image).  An ERF with no positive mass gives the whole image.

    Parameters
    ----------
    erf
        (H, W) an ERF map.
    mass
        The share of the positive mass the box must hold, in (0, 1].
    min_size
        The smallest side of the box, in pixels.

    Returns
    -------
    tuple of int
        ``(top, left, bottom, right)``, ends exclusive.

    Raises
    ------
    srd_fx.InputError
        If ``erf`` is not 2-d or ``mass`` is outside (0, 1].
    """
    if erf.dim() != 2:
        raise InputError(f"an ERF map must be (H, W), got {tuple(erf.shape)}")
    if not 0 < mass <= 1:
        raise InputError(f"mass must be in (0, 1], got {mass}")
    H, W = erf.shape
    w = erf.detach().double().clamp_min(0).reshape(-1)
    tot = w.sum()
    if tot <= 0:
        return 0, 0, H, W
    s, idx = w.sort(descending=True)
    n = int(torch.searchsorted(s.cumsum(0), mass * tot).clamp_max(len(s) - 1)) + 1
    hs, ws = idx[:n] // W, idx[:n] % W
    t, b, l, r = int(hs.min()), int(hs.max()) + 1, int(ws.min()), int(ws.max()) + 1

    def grow(a, z, size):
        need = min(min_size, size) - (z - a)
        if need > 0:
            a = max(0, a - need // 2)
            z = min(size, a + max(z - a, min(min_size, size)))
            a = z - max(z - a, min(min_size, size))
        return a, z
    t, b = grow(t, b, H)
    l, r = grow(l, r, W)
    return t, l, b, r


# ----------------------------------------------------------------------------- one query -------
@dataclass
class PFVView:
    """One PFV shown by its ERF.

    Attributes
    ----------
    image
        Index of the image in the data.
    position
        The PFV's position on the layer's grid.
    layer
        The PFV's layer.
    erf
        (H, W) its ERF.
    box
        ``(top, left, bottom, right)`` from :func:`erf_box`.
    score
        Cosine similarity for a neighbour, sharing ratio for a sub-concept, share of the relevance
        for the query.
    label
        The image's class label, when known.
    """
    image: int
    position: Position
    layer: str
    erf: torch.Tensor
    box: Tuple[int, int, int, int]
    score: float = float("nan")
    label: Optional[int] = None


@dataclass
class ConceptExplanation:
    """What :func:`explain_pfv` returns.

    Attributes
    ----------
    query
        The query PFV (score: its share of the prediction's relevance at its layer,
        ``R^k_j / sum R^k``, for class ``target``).
    neighbours
        Its nearest PFVs from other images (score: cosine similarity).
    sub_concepts
        The PFVs of the previous layer(s) with the largest sharing ratios ``mu^{l->k}_{i->j}``
        (score), largest first.
    shares
        ``{input layer key: (h, w) map of all sharing ratios of the query}``.
    relevance
        (h, w) relevance of the query image at the query's layer.
    target
        The explained class.
    logits
        The model's logits for the query image.
    layer_names
        Readable names of the layer keys.
    """
    query: PFVView
    neighbours: List[PFVView]
    sub_concepts: List[PFVView]
    shares: Dict[str, torch.Tensor]
    relevance: torch.Tensor
    target: int
    logits: torch.Tensor
    layer_names: Dict[str, str] = field(default_factory=dict)


def _erfs_at(explainer, xs: torch.Tensor, layer: str, positions: List[Position]) -> torch.Tensor:
    """ERF of PFV ``positions[b]`` of sample ``b`` (one one-hot seed per sample): (B, H, W)."""
    lay = _layer(explainer, layer)
    sp = [s for i, s in enumerate(explainer.info.shape(lay.node)) if i != 0 and i not in explainer.info.caxes(lay.node)]
    seed = torch.zeros([xs.shape[0]] + sp, dtype=xs.dtype, device=xs.device)
    for b, p in enumerate(positions):
        seed[(b,) + tuple(p)] = 1
    return explainer.propagate(xs, layer, seed)


@torch.no_grad()
def explain_pfv(explainer: "srd_fx.Explainer", index: PFVIndex, data: Data, image: int, position: Optional[Sequence[int]] = None,
                *, k: int = 3, n_sub: int = 4, target: Optional[int] = None,
                transform: Optional[Callable] = None, distinct_images: bool = True, mass: float = 0.9,
                min_size: int = 8, labels: Optional[Sequence[int]] = None) -> ConceptExplanation:
    """What PFV ``position`` of ``index.layer`` in image ``image`` of ``data`` encodes (its ``k``
    nearest PFVs in other images of the index, with their ERFs) and what it is made of (its
    ``n_sub`` largest sub-concepts, with their ERFs).

    Parameters
    ----------
    explainer
        The explainer of the model.
    index
        A :class:`PFVIndex` of the layer, built from ``data``.
    data
        What the index was built from (same order): a tensor or a Dataset of images.
    image
        The query image's index.
    position
        The query PFV's position; default: the PFV with the largest SRD relevance at that layer.
    k
        Nearest PFVs of other images to return.
    n_sub
        Sub-concepts to return.
    target
        The class explained (default: the predicted class).
    transform
        Maps raw images to model inputs.
    distinct_images
        At most one neighbour per image.
    mass
        ERF mass the crops hold (see :func:`erf_box`).
    min_size
        Smallest crop side, in pixels.
    labels
        Class label per image (default: the index's labels).

    Returns
    -------
    ConceptExplanation
        The query, its neighbours and its sub-concepts, each with its ERF.

    Raises
    ------
    srd_fx.InputError
        If the index does not know its layer, or the image or position is outside it.
    """
    layer = index.layer
    if layer is None:
        raise InputError("the index does not know its layer: build it with PFVIndex.build(...)")
    if not 0 <= image < _n_items(data):
        raise InputError(f"image {image} is outside the data ({_n_items(data)} images)")
    p = next(explainer.model.parameters(), None)
    dev, dt = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    prep = (lambda t: transform(t.to(dev, dt))) if transform else (lambda t: t.to(dev, dt))
    x = prep(_item(data, image)[None])
    _ensure_built(explainer, x)
    lab = (lambda i: int(labels[i])) if labels is not None else \
        (lambda i: int(index.labels[i]) if index.labels is not None else None)

    # the query's share of the prediction at its layer
    out = explainer(x, target)
    if layer not in out.relevance:  # the explainer was compiled without this layer: one that has it
        import srd_fx
        out = srd_fx.compile(explainer.model, explainer.options, layers=(layer,), example_input=x)(x, target)
    tgt = int(out.logits.argmax(1)) if target is None else int(target)
    rel = out.relevance[layer][0]
    if position is None:
        position = tuple(int(v) for v in torch.unravel_index(rel.argmax(), rel.shape))
    position = tuple(int(v) for v in position)
    row = index.row(image, position)
    tot = rel.sum()
    share = float(rel[position] / tot) if tot != 0 else float("nan")

    # what it encodes: nearest PFVs of other images
    q = index.vectors[row] * index.norms[row]
    sims, rows = index.search(q, k, exclude_images=image, distinct_images=distinct_images)
    found = [(float(s), r) for s, r in zip(sims.tolist(), rows.tolist()) if r >= 0]
    locs = index.locate([r for _, r in found])
    erf_q = explainer.erf(x, layer, [position])[0, 0].detach()
    neighbours = []
    if locs:
        xs = torch.cat([prep(_item(data, i)[None]) for i, _ in locs])
        erfs = _erfs_at(explainer, xs, layer, [pp for _, pp in locs]).detach()
        for (s, _), (i, pp), e in zip(found, locs, erfs):
            neighbours.append(PFVView(i, pp, layer, e.cpu(), erf_box(e, mass, min_size), s, lab(i)))

    # what it is made of: the sharing ratios to the previous layer(s)
    shares = {kk: v[0, 0].cpu() for kk, v in sub_concepts(explainer, x, layer, [position]).items()}
    # largest shares first; PFVs outside the block's receptive field (share exactly 0) are skipped
    flat = [(float(v.reshape(-1)[j]), kk, j) for kk, v in shares.items()
            for j in torch.nonzero(v.reshape(-1)).reshape(-1).tolist()]
    flat.sort(key=lambda t: -t[0])
    subs = []
    for s, kk, j in flat[:n_sub]:
        pos = tuple(int(v) for v in torch.unravel_index(torch.tensor(j), shares[kk].shape))
        if kk == "input":
            e = torch.zeros(x.shape[-2:], dtype=x.dtype)
            e[pos] = 1
        else:
            e = explainer.erf(x, kk, [pos])[0, 0].detach()
        subs.append(PFVView(image, pos, kk, e.cpu(), erf_box(e, mass, min_size), s, lab(image)))
    names = {kk: (layer_name(explainer, explainer.info.node_for(kk)) if kk != "input" else "input") for kk in shares}
    names[layer] = layer
    query = PFVView(image, position, layer, erf_q.cpu(), erf_box(erf_q, mass, min_size), share, lab(image))
    return ConceptExplanation(query, neighbours, subs, shares, rel.cpu(), tgt, out.logits[0].cpu(), names)


# ----------------------------------------------------------------------------- the figure ------
def _rgb(img: torch.Tensor):
    import numpy as np
    a = img.detach().cpu().double()
    if a.dim() == 3 and a.shape[0] in (1, 3):
        a = a.permute(1, 2, 0)
    a = a.numpy()
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:  # not a [0, 1] image: stretch for display
        a = (a - lo) / (hi - lo if hi > lo else 1)
    return np.clip(a, 0, 1)


def _weighted_crop(img, view: PFVView):
    """The ERF box of ``img`` (H, W, 3), pixels dimmed where the ERF is small."""
    import numpy as np
    e = view.erf.double().clamp_min(0).numpy()
    e = np.sqrt(e / e.max()) if e.max() > 0 else np.ones_like(e)
    t, l, b, r = view.box
    w = (0.25 + 0.75 * e)[..., None] if img.ndim == 3 else 0.25 + 0.75 * e
    return (img * w)[t:b, l:r]


def plot_concepts(res: ConceptExplanation, data: Data, *, class_names: Optional[Sequence[str]] = None,
                  title: Optional[str] = None, cmap: str = "bwr") -> "matplotlib.figure.Figure":
    """The Fig. 5-style figure of an :func:`explain_pfv` result: top row — the query image with the
    query PFV's ERF, its ERF crop and the ERF crops of its nearest PFVs in other images; bottom row —
    the sharing ratios of the query over the previous layer and the ERF crops of its largest
    sub-concepts.  ``data`` gives the raw images (for display); maps are drawn with the diverging
    ``cmap`` (positive red, negative blue by default), transparent where 0.  Needs matplotlib (the
    ``eval`` extra).

    Parameters
    ----------
    res
        The result of :func:`explain_pfv`.
    data
        The raw images, for display.
    class_names
        Names of the classes (default: their indices).
    title
        The figure's title.
    cmap
        A diverging matplotlib colormap.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    name = (lambda c: "?" if c is None else (class_names[c] if class_names else str(c)))
    ncol = max(2 + len(res.neighbours), 1 + len(res.shares) + len(res.sub_concepts), 3)
    fig, axes = plt.subplots(2, ncol, figsize=(2.1 * ncol, 5.4), squeeze=False)
    for a in axes.ravel():
        a.axis("off")
    q = res.query
    img = _rgb(_item(data, q.image))

    def box(ax, b, color="w"):
        t, l, bb, r = b
        ax.add_patch(Rectangle((l - .5, t - .5), r - l, bb - t, fill=False, ec=color, lw=1.5))

    def heat(ax, m, extent=None):
        """``m`` over the image: colour by sign and size, opacity by size (0 is transparent)."""
        m = m / (np.abs(m).max() or 1)
        rgba = plt.get_cmap(cmap)(0.5 + 0.5 * m)
        rgba[..., 3] = 0.85 * np.sqrt(np.abs(m))
        ax.imshow(img, extent=extent)
        ax.imshow(rgba, extent=extent)

    ax = axes[0, 0]
    heat(ax, q.erf.double().numpy())
    box(ax, q.box)
    ax.set_title(f"query: image {q.image}\n{q.layer} {q.position}", fontsize=8)
    ax = axes[0, 1]
    ax.imshow(_weighted_crop(img, q))
    ax.set_title(f"query ERF crop\nclass {name(res.target)}, {100 * q.score:.1f}% of R", fontsize=8)
    for c, nb in enumerate(res.neighbours):
        ax = axes[0, 2 + c]
        ax.imshow(_weighted_crop(_rgb(_item(data, nb.image)), nb))
        lab = "" if nb.label is None else f", label {name(nb.label)}"
        ax.set_title(f"NN{c + 1}: image {nb.image}{lab}\n{nb.position}, cos {nb.score:.3f}", fontsize=8)
    # bottom row: share maps, then sub-concept crops
    col = 0
    for kk, s in res.shares.items():
        ax = axes[1, col]
        s = s.double().numpy()
        heat(ax, s, extent=(-.5, s.shape[1] - .5, s.shape[0] - .5, -.5))
        ax.set_title(f"mu to {res.layer_names.get(kk, kk)}\n(sum {s.sum():.3f})", fontsize=8)
        col += 1
    for sc in res.sub_concepts:
        if col >= ncol:
            break
        ax = axes[1, col]
        ax.imshow(_weighted_crop(img, sc))
        ax.set_title(f"{res.layer_names.get(sc.layer, sc.layer)} {sc.position}\nmu = {sc.score:.3f}", fontsize=8)
        col += 1
    fig.suptitle(title or f"what {q.layer} {q.position} encodes (top) and what it is made of (bottom)",
                 fontsize=9)
    fig.tight_layout(h_pad=1.5)
    return fig
