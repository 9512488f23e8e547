"""Graph analysis (SPEC §1): activation layers, gates, the encoder output L, affine blocks and
the channel layout of every tensor, on a networkx view of the traced graph."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from srd_fx import rules as R

from ..errors import LayerError, UnsupportedOpError
from srd_fx.rules.products import uniform_rule
from .trace import ENCODER_TAG, encoder_items, encoder_node

# ops that only re-view a tensor: a gate stays a gate through them
_VIEWS = {"view", "reshape", "expand", "expand_as", "contiguous", "flatten", "unsqueeze", "squeeze",
          "to", "type_as", "float"}
# methods whose tensor arguments after ``self`` lend only metadata (dtype, device, shape):
# ``lam.type_as(q)`` is a constant when ``lam`` is, whatever ``q`` is
_META_ONLY_ARGS = {"type_as", "to", "expand_as", "view_as", "reshape_as"}
_METADATA = (torch.dtype, torch.device, torch.Size, int, float, bool, str, type(None))
_RESAMPLES = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear"}
_REDUCTIONS = {"var", "std", "mean", "sum", "norm", "amax", "amin", "vector_norm", "var_mean", "std_mean"}
_STAT_UNARY = {"sqrt", "rsqrt", "add", "sub", "mul", "truediv", "div", "pow", "clamp", "clamp_min",
               "square", "abs", "reciprocal", "iadd", "imul", "getitem"}


def how_to_register(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        cls = type(modules[node.target])
        tgt = f"{cls.__module__}.{cls.__name__}"
    elif node.op == "call_function":
        tgt = f"{getattr(node.target, '__module__', '?')}.{getattr(node.target, '__name__', node.target)}"
    else:
        tgt = f'"method:{node.target}"'
    return (f"Register a rule for it, e.g.\n"
            f"    import srd_fx\n"
            f"    from srd_fx.rules import Affine, Activation\n"
            f"    srd_fx.register_rule({tgt}, Affine())        # linear in its input, keeps positions\n"
            f"    srd_fx.register_rule({tgt}, Activation(fn))  # an element-wise nonlinearity\n"
            f"(docs/rules.md: the Rule contract and one worked example of each kind of op).")


def single_input(gm: fx.GraphModule) -> fx.Node:
    """The model's one tensor input (defaulted arguments were traced at their defaults)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedOpError(
            f"srd_fx explains models with exactly one tensor input; this forward takes "
            f"{[p.name for p in placeholders]}. Wrap the model so that forward(x) takes one tensor.")
    return placeholders[0]


@dataclass
class Layer:
    """An activation layer (or the virtual identity layer at L)."""
    name: str
    node: fx.Node            # the activation node (its output feeds later blocks), or L
    pre: fx.Node             # the block output v (pre-activation)
    virtual: bool = False
    block: List[fx.Node] = field(default_factory=list)   # topological order, excluding inputs
    inputs: List[fx.Node] = field(default_factory=list)  # activation outputs / the model input


class _Marked:
    """The graph as a rule's ``layout`` sees it, with the axes ``axes`` of ``x`` marked as its only
    channel axes: where the rule puts them is where those axes go (GraphInfo.origin)."""

    def __init__(self, info, x, axes):
        self._info, self._x, self._axes = info, x, tuple(axes)

    def caxes(self, n):
        return self._axes if n is self._x else self._info.caxes(n)

    def provenance_layout(self, node, absorb=False):
        return self._info.provenance_layout(node, caxes=self.caxes, absorb=absorb)

    def __getattr__(self, name):
        return getattr(self._info, name)


class GraphInfo:
    """Everything the builder and the rules need to know about the traced graph."""

    def __init__(self, gm: fx.GraphModule, encoder_output: Optional[str] = None, output_selector=None):
        self.gm = gm
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.input = single_input(gm)
        self.output = next(n for n in self.nodes if n.op == "output")
        self.logits_node = self.output
        out = self.output.args[0]
        if output_selector is not None and not callable(output_selector):
            try:  # a key/index selects the logits node: the analysis starts from it
                sel = out[output_selector]
                if isinstance(sel, fx.Node):
                    self.logits_node = sel
            except (KeyError, IndexError, TypeError):
                pass
        self.nx = nx.DiGraph()
        for n in self.nodes:
            self.nx.add_node(n)
            for i in n.all_input_nodes:
                self.nx.add_edge(i, n)
        self.rule: Dict[fx.Node, Optional[R.Rule]] = {n: R.lookup(n, self.modules) for n in self.nodes}
        self.dep = self._depends_on_input()
        self._refuse_recurrent()
        self._refuse_non_logits()
        self.gates: Dict[fx.Node, fx.Node] = {}
        self._find_gates()
        self.caxes_: Dict[fx.Node, Tuple[int, ...]] = {self.input: (1,)}
        self.folded: set = set()     # nodes whose batch axis holds channels (provenance_layout)
        self.absorbs: set = set()    # reshapes that merge positions into channels (provenance_layout)
        self.L_segments = None
        if encoder_output is None:
            self._pack_encoder_outputs()
        self.L = self._encoder_output(encoder_output)
        self.layers = self._layers()

    def _refuse_non_logits(self):
        """A model whose output is not (batch, classes) (an encoder returning its tokens or feature
        maps) has no logit to explain: refused by name, with what to do."""
        out = self.logits_node if self.logits_node is not self.output else self.output.args[0]
        shape = self.shape(out) if isinstance(out, fx.Node) and self.is_tensor(out) else None
        if shape is not None and len(shape) > 2:
            raise UnsupportedOpError(
                f"the model's output has shape {tuple(shape)}, not (batch, classes): srd_fx explains the "
                "logits of a classifier. Give the model a classification head (for timm, a model with a "
                "head and num_classes > 0; encoder-only models such as the '*_enc' variants have none) or "
                "wrap it so that it returns (batch, classes) logits.")

    def _refuse_recurrent(self):
        for n in self.nodes:
            if n.op == "call_module" and self.rule.get(n) is None and self.dep.get(n) \
                    and isinstance(self.modules[n.target], torch.nn.RNNBase):
                raise UnsupportedOpError(
                    f"node {n.name!r} is a recurrent layer ({type(self.modules[n.target]).__name__} "
                    f"{n.target!r}): its state carries information between positions through nonlinear "
                    "gates, which SRD's affine blocks cannot represent (recurrent layers are refused). "
                    "Explain the part of the model before it with encoder_output='<a module before it>' "
                    "and a head that runs the rest.")

    # ------------------------------------------------------------------ basic facts --------
    def is_tensor(self, n) -> bool:
        return isinstance(n, fx.Node) and isinstance(n.meta.get("tensor_meta"), TensorMetadata)

    def shape(self, n) -> Tuple[int, ...]:
        if not self.is_tensor(n):
            raise UnsupportedOpError(f"node {getattr(n, 'name', n)!r} is not a tensor")
        return tuple(n.meta["tensor_meta"].shape)

    def module(self, node):
        return self.modules[node.target]

    def _depends_on_input(self):
        """Which nodes' values depend on the input.  Metadata of the input (``x.dtype``,
        ``x.shape``, ``x.size(2)``) does not carry input values: ``tau.to(x.dtype)`` is a constant."""
        dep = {}
        for n in self.nodes:
            ins = n.all_input_nodes
            if n.op == "call_method" and n.target in _META_ONLY_ARGS and isinstance(n.args[0], fx.Node):
                ins = [n.args[0]]
            dep[n] = n.op == "placeholder" or any(dep.get(i, False) and n.meta.get("type") not in _METADATA
                                                  and i.meta.get("type") not in _METADATA for i in ins)
        return dep

    def _split_source(self, node):
        """For ``getitem(split(x), i)``: x."""
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op in ("call_method", "call_function"):
                t = src.target if isinstance(src.target, str) else getattr(src.target, "__name__", "")
                if t in ("split", "chunk", "unbind"):
                    return src.args[0]
        return None

    def main_inputs(self, node) -> List[fx.Node]:
        """Tensor inputs of ``node`` that carry relevance (input-dependent, not gates)."""
        src = self._split_source(node)
        if src is not None:
            return [src] if self.dep.get(src) else []
        out = []
        gate = self.gates.get(node)

        def visit(a):
            if isinstance(a, fx.Node) and self.dep.get(a) and self.is_tensor(a) and a is not gate:
                out.append(a)
            return a

        rule = self.rule.get(node)
        sel = rule.main_args if rule is not None else None
        if sel is not None:  # the rule says which arguments carry relevance (others: constants)
            fx.node.map_arg(tuple(node.args[i] for i in sel if i < len(node.args)), visit)
        else:
            fx.node.map_arg((node.args, node.kwargs), visit)
        return out

    # ------------------------------------------------------------------ gates --------------
    def _producer(self, n):
        from srd_fx.rules.elementwise import Identity
        while isinstance(n, fx.Node) and n.args and (
                (n.op == "call_method" and n.target in _VIEWS) or
                (n.op == "call_function" and getattr(n.target, "__name__", "") in _VIEWS) or
                isinstance(self.rule.get(n), Identity)):   # eval-mode dropout of attention weights
            n = n.args[0]
        return n

    def _gate_capable(self, n) -> bool:
        p = self._producer(n)
        while isinstance(p, fx.Node) and p.op == "call_function" and \
                getattr(p.target, "__name__", "") in _RESAMPLES and p.args:
            p = self._producer(p.args[0])   # an upsampled gate (GhostNetV2's attention) is a gate
        r = self.rule.get(p)
        if isinstance(r, R.Activation):
            return r.gate_capable
        # attention weights re-mixed after the softmax by ops linear in them (CaiT's talking
        # heads: a linear layer across heads, permutes) are still the gate branch
        for _ in range(8):
            if not isinstance(p, fx.Node) or r is None or r.kind != "affine":
                return False
            # the inputs that carry relevance: a division by a statistic of the weights (ConViT's
            # renormalised mix of two softmaxes, attn / attn.sum(-1)) follows the numerator
            deps = list(dict.fromkeys(self.main_inputs(p)))
            if len(deps) != 1:
                return False
            p = self._producer(deps[0])
            r = self.rule.get(p)
            if isinstance(r, R.Activation):
                return r.gate_capable and "softmax" in (r.name or "").lower()
        return False

    def _statistic(self, n) -> bool:
        """``n`` is a normalisation statistic broadcast back to full shape (EvoNorm's
        ``group_std(x).expand(...).reshape(B, C, H, W)``): a reduction of an input-dependent
        tensor (var/std/mean/sum/norm with fewer elements than its input) followed only by views
        and element-wise ops with constants (sqrt, rsqrt, + eps, ...)."""
        seen = 0
        while isinstance(n, fx.Node) and seen < 32:
            seen += 1
            name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
            if n.op not in ("call_method", "call_function"):
                return False
            if name in _REDUCTIONS:
                src = n.args[0] if n.args else None
                return self.is_tensor(n) and self.is_tensor(src) and \
                    math.prod(self.shape(n)) < math.prod(self.shape(src))
            dep = [a for a in n.all_input_nodes if self.dep.get(a)]
            if len(dep) != 1 or not (name in _VIEWS or name in _STAT_UNARY):
                return False
            n = dep[0]
        return False

    def _reduced(self, a, c) -> bool:
        """``a`` broadcasts onto ``c`` with fewer elements (a squeeze branch, a spatial attention
        map, a normalisation statistic)."""
        if not (self.is_tensor(a) and self.is_tensor(c)):
            return False
        sa, sc = self.shape(a), self.shape(c)
        if len(sa) != len(sc):
            return False
        return all(x == y or x == 1 for x, y in zip(sa, sc)) and any(x == 1 and y > 1 for x, y in zip(sa, sc))

    def _find_gates(self):
        """For every product of two input-dependent tensors, the factor that is a gate (SPEC §2):
        a sigmoid/hardsigmoid/softmax output, or a factor reduced over some axes of the other
        (a (B, C, 1, 1) squeeze branch, a (B, 1, H, W) attention map, a normalisation statistic)."""
        for n in self.nodes:
            r = self.rule.get(n)
            pos = r.gate_args if r is not None else ()
            if not pos or not self.is_tensor(n):
                continue
            ops_ = [n.args[i] if i < len(n.args) else None for i in pos]
            dep = [a for a in ops_ if isinstance(a, fx.Node) and self.dep.get(a) and self.is_tensor(a)]
            if len(dep) < 2:
                continue
            a, c = ops_[0], ops_[1]
            if r.divisor_only:
                if self._reduced(c, a) or self._gate_capable(c) or self._statistic(c):
                    self.gates[n] = c
                continue
            ra, rc = self._reduced(a, c) or self._statistic(a), self._reduced(c, a) or self._statistic(c)
            if ra != rc:
                self.gates[n] = a if ra else c
                continue
            ga, gc = self._gate_capable(a), self._gate_capable(c)
            if ga != gc:
                self.gates[n] = a if ga else c
            elif ga and gc:
                # both are sigmoid-like outputs of the same shape (a one-channel sigmoid
                # activation times a CBAM spatial gate): the one computed from the other is the gate
                a_to_c, c_to_a = nx.has_path(self.nx, a, c), nx.has_path(self.nx, c, a)
                if a_to_c != c_to_a:
                    self.gates[n] = c if a_to_c else a
            # otherwise: no identifiable gate: a product of two input-dependent tensors follows
            # the uniform rule (SPEC §8) where it is one
            if n not in self.gates and not getattr(r, "divisor_only", False):
                u = uniform_rule(r)
                if u is not None:
                    self.rule[n] = u

    # ------------------------------------------------------------------ L ------------------
    def _pack_encoder_outputs(self):
        """A timm ``forward_features`` that returns several tensors (CrossViT's branches, CoaT's
        scales): they are packed into one token tensor L ``(B, sum of positions, widest
        channels)`` (``srd_fx.rules.shape.pack_features``) that the head unpacks; Eq. 4's mean
        then runs over the positions of each tensor (``L_segments``)."""
        items = encoder_items(self.gm)
        if not items or encoder_node(self.gm) is not None or \
                not all(self.is_tensor(n) and self.dep.get(n) for n in items) or len(set(items)) != len(items):
            return
        from srd_fx.rules.shape import pack_features, unpack_feature
        from torch.fx.passes.shape_prop import _extract_tensor_metadata
        specs, segments, start = [], [], 0
        for n in items:
            shape, ci = self.shape(n), self.caxes(n)
            pos = [d for d in range(1, len(shape)) if d not in ci]
            specs.append((tuple([0] + pos + list(ci)), tuple(shape[d] for d in pos), tuple(shape[d] for d in ci)))
            segments.append((start, start + math.prod(specs[-1][1])))
            start = segments[-1][1]
        last = max(items, key=self.order.get)
        later = {u for n in items for u in n.users if self.order[u] > self.order[last]}
        with self.graph.inserting_after(last):
            pack = self.graph.call_function(pack_features, (list(items), specs))
        metas = [torch.empty(self.shape(n), dtype=n.meta["tensor_meta"].dtype, device="meta") for n in items]
        pack.meta.update({ENCODER_TAG: True, "tensor_meta": _extract_tensor_metadata(pack_features(metas, specs)),
                          "type": torch.Tensor})
        at = pack
        for i, n in enumerate(items):
            with self.graph.inserting_after(at):
                at = self.graph.call_function(unpack_feature, (pack, i, specs))
            at.meta.update({"tensor_meta": n.meta["tensor_meta"], "type": torch.Tensor})
            for u in later & set(n.users):
                u.replace_input_with(n, at)
        self.gm.recompile()
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.nx = nx.DiGraph()
        for n in self.nodes:
            self.nx.add_node(n)
            for i in n.all_input_nodes:
                self.nx.add_edge(i, n)
        for n in self.nodes:
            if n not in self.rule:
                self.rule[n] = R.lookup(n, self.modules)
                self.dep[n] = True
        self.L_segments = segments

    def node_for(self, name: str) -> fx.Node:
        """A node by fx name, or the output node of a module by qualified name."""
        for n in self.nodes:
            if n.name == name:
                return n
        last = None
        for n in self.nodes:
            if n.op == "call_module" and n.target == name:
                last = n
            stack = n.meta.get("nn_module_stack") or {}
            if any(v[0] == name if isinstance(v, tuple) else False for v in stack.values()):
                last = n
        if last is None:
            raise LayerError(f"no node or module named {name!r}")
        return last

    def _encoder_output(self, name) -> fx.Node:
        if name is not None:
            return self.node_for(name)
        tagged = encoder_node(self.gm)
        if tagged is not None:
            return tagged
        idom = nx.immediate_dominators(self.nx, self.input)
        chain, n = [], self.logits_node
        while n is not self.input:
            chain.append(n)
            n = idom[n]
        for n in reversed(chain):
            r = self.rule.get(n)
            if r is not None and self.is_tensor(n) and r.is_global_reduction(self, n):
                ins = self.main_inputs(n)
                if ins:
                    return ins[0]
        raise UnsupportedOpError(
            "could not find the encoder output L (no global spatial reduction — adaptive pooling "
            "to 1x1, a spatial mean or a flatten of a 4-D tensor — on every path to the logits). "
            "Pass encoder_output='<module or node name>' to srd_fx.compile.")

    # ------------------------------------------------------------------ layout -------------
    def caxes(self, n) -> Tuple[int, ...]:
        if n not in self.caxes_:
            r = self.rule.get(n)
            if n.op == "placeholder":
                self.caxes_[n] = (1,)
            elif r is None or r.kind == "activation" or not self.main_inputs(n):
                ins = self.main_inputs(n)
                self.caxes_[n] = self.caxes(ins[0]) if ins else (1,)
                self._carry_fold(n, r)
            else:
                self.caxes_[n] = tuple(r.layout(self, n))
                self._carry_fold(n, r)
        return self.caxes_[n]

    def _carry_fold(self, n, r):
        """An op on a tensor with heads folded into the batch axis that keeps the batch axis (a
        matrix product, a convolution, an element-wise op, a split) gives a folded tensor too;
        reshapes decide for themselves (provenance_layout)."""
        from srd_fx.rules.shape import Permute, Reshape
        if n in self.folded or isinstance(r, Reshape) or not self.is_tensor(n):
            return
        if isinstance(r, Permute) and r._perm(self, n)[0] != 0:
            return
        if any(i in self.folded and self.shape(i)[0] == self.shape(n)[0] for i in self.main_inputs(n)):
            self.folded.add(n)

    def provenance_layout(self, node, caxes=None, absorb=False) -> Tuple[int, ...]:
        """Channel axes of ``node`` found from where its elements come from, for a chain of
        reshapes and permutes that passed through tensors with channels folded into the batch
        axis or mixed with positions (MobileViT's patches, MViTv2's and BoTNet's heads): the chain
        is replayed on the channel and the position index of every element of its last labelled
        source.  An axis along which only the channel index changes is a channel axis, one along
        which only the position index changes a position axis.  ``()`` (unlabelled: maps are kept
        at full size, spread over the channels) when some axis mixes both, or the batch axis
        holds channels and positions.  When the batch axis holds channels only (attention heads
        folded into it) and every other axis is pure, the node is *folded* (``self.folded``): its
        channel axes are those of the other axes, and its maps have one row per batch row (head),
        as if each were a sample.  ``absorb``: an axis that mixes channels and positions is a
        channel axis that *absorbs* those positions (TNT's pixel tokens merged into their patch's
        PFV, ``(B * N, 16, C) -> (B, N, 16 * C)``), provided a position axis is left; the node is
        then recorded in ``self.absorbs``.  ``caxes``: the labelling to start from (default: the
        analysis's own; only that one records folded and absorbing nodes)."""
        own = caxes is None
        caxes = self.caxes if caxes is None else caxes
        chain, n = [], node
        while True:
            ins = self.main_inputs(n)
            if len(ins) != 1 or not self.is_tensor(ins[0]):
                return ()
            chain.append(n)
            n = ins[0]
            if caxes(n) != () and n not in self.folded and n not in self.absorbs:
                break
            if len(chain) > 64:
                return ()
        shape, ca = self.shape(n), caxes(n)
        if 0 in ca:
            # a permute put a channel axis in front (SAM's qkv.permute(2, 0, 3, 1, 4)): where the
            # samples go is not in the replay (the trace has one), so nothing is read from it
            return ()
        # the trace runs on one sample: the batch axis of the source holds positions folded into it
        pos = [1 if d in ca else s for d, s in enumerate(shape)]
        ch = [s if d in ca else 1 for d, s in enumerate(shape)]
        # float indices: slots that unfold pads hold NaN (no element), ignored below
        P = torch.arange(math.prod(pos), dtype=torch.float64).reshape(pos).expand(shape)
        C = torch.arange(math.prod(ch), dtype=torch.float64).reshape(ch).expand(shape)
        for m in reversed(chain):
            P, C = self._replay(m, P, C)
            if P is None:
                return ()

        def moves(t, d):
            if t.shape[d] < 2:
                return False
            a, b = t.narrow(d, 1, t.shape[d] - 1), t.narrow(d, 0, t.shape[d] - 1)
            return bool(((a != b) & ~a.isnan() & ~b.isnan()).any())

        out, mixed, positions = [], False, False
        for d in range(1, P.dim()):
            mp, mc = moves(P, d), moves(C, d)
            if mp and mc and not absorb:
                return ()
            mixed |= mp and mc
            positions |= mp and not mc
            if mc:
                out.append(d)
        if mixed and not positions:
            return ()
        if moves(C, 0):
            if moves(P, 0) or mixed:
                return ()
            if own:
                self.folded.add(node)
        if mixed and own:
            self.absorbs.add(node)
        return tuple(out)

    def _replay(self, m, P, C):
        """One step of :meth:`provenance_layout`: the position and channel indices ``P``, ``C`` of
        ``m``'s main input carried to ``m``'s output, or (None, None) when ``m`` is not an op the
        replay knows.  Rearrangements move the indices; another op that keeps the batch axis (a
        matrix product with a gate, a convolution on heads folded into the batch) gets fresh
        indices from its own layout, keeping each batch row's channel and position part."""
        from srd_fx.rules.elementwise import Identity
        from srd_fx.rules.shape import GetItem, Permute, Reshape, TensorUnfold, Unfold, Unsqueeze, unfold_args
        r = self.rule.get(m)
        out_shape = self.shape(m)
        if isinstance(r, Unfold):
            args = unfold_args(self, m)
            P, C = (torch.nn.functional.unfold(t + 1, *args) for t in (P, C))
            return tuple(t.masked_fill(t == 0, float("nan")) - 1 for t in (P, C))
        if isinstance(r, TensorUnfold):
            return tuple(t.unfold(*r.spec(m, t.dim())) for t in (P, C))
        if isinstance(r, (Reshape, Unsqueeze)):
            return P.reshape(out_shape), C.reshape(out_shape)
        if isinstance(r, Permute):
            p = r._perm(self, m)
            return P.permute(p), C.permute(p)
        if isinstance(r, Identity) and out_shape == tuple(P.shape):
            return P, C
        if isinstance(r, GetItem) and r._split(m):
            x, how, size, dim, i = r._split(m)
            from srd_fx.rules.shape import split_item
            return split_item(P, how, size, dim, i), split_item(C, how, size, dim, i)
        if r is None or r.kind == "meta" or P.dim() == 0 or out_shape[0] != P.shape[0] or self.caxes(m) == ():
            return None, None
        # a new tensor with the same batch rows: each row keeps its channel and position part
        row = lambda t: torch.nan_to_num(t.flatten(1), nan=-1.0).amax(1)   # noqa: E731
        ca = self.caxes(m)
        pos = [1 if d in ca or d == 0 else s for d, s in enumerate(out_shape)]
        ch = [s if d in ca else 1 for d, s in enumerate(out_shape)]
        lead = (-1,) + (1,) * (len(out_shape) - 1)
        newP = row(P).reshape(lead) * math.prod(pos) + torch.arange(math.prod(pos), dtype=torch.float64).reshape(pos)
        newC = row(C).reshape(lead) * math.prod(ch) + torch.arange(math.prod(ch), dtype=torch.float64).reshape(ch)
        return newP.expand(out_shape), newC.expand(out_shape)

    # ------------------------------------------------------------------ read-out orientation
    def origin(self, n) -> Tuple[Optional[int], ...]:
        """For each axis of ``n``: the input axis it descends from, None where unknown (a new,
        merged or reduced axis).  An axis is followed through an op the way the op's rule moves
        channel axes (``Rule.layout``), with that axis marked as the only channel axis: a
        permute/transpose/movedim moves it, an op that keeps the rank and does not move marked
        axes keeps it in place."""
        cache = self.__dict__.setdefault("_origin", {})
        chain = []                      # n and its first main inputs back to a known node
        while n not in cache:
            chain.append(n)
            ins = [] if n.op == "placeholder" or not self.is_tensor(n) else self.main_inputs(n)
            if not ins or not self.is_tensor(ins[0]):
                break
            n = ins[0]
        for m in reversed(chain):
            cache[m] = self._origin_step(m, cache)
        return cache[chain[0] if chain else n]

    def _origin_step(self, n, cache) -> Tuple[Optional[int], ...]:
        rank = len(self.shape(n)) if self.is_tensor(n) else 0
        ins = [] if n.op == "placeholder" or not self.is_tensor(n) else self.main_inputs(n)
        if n.op == "placeholder":
            o = tuple(range(rank))
        elif not ins or not self.is_tensor(ins[0]):
            o = (None,) * rank
        else:
            x = ins[0]
            ox, sx, sn = cache[x], self.shape(x), self.shape(n)
            rule = self.rule.get(n)
            moved = {}
            if rule is not None and rule.kind != "activation":
                for a in range(1, len(sx)):
                    try:
                        to = tuple(rule.layout(_Marked(self, x, (a,)), n))
                    except (UnsupportedOpError, ValueError, IndexError, KeyError, TypeError):
                        continue
                    if len(to) == 1 and 0 < to[0] < rank and sn[to[0]] == sx[a]:
                        moved[a] = to[0]
            targets = list(moved.values())
            is_perm = len(sx) == rank and len(moved) == rank - 1 and len(set(targets)) == rank - 1
            if is_perm:
                o = [ox[0]] + [None] * (rank - 1)
                for a, t in moved.items():
                    o[t] = ox[a]
            elif len(sx) == rank:                       # rank kept, nothing moved: in place
                o = list(ox)
            else:                                       # an output axis reached from one input axis
                o = [ox[0] if rank else None] + [None] * (rank - 1)
                for a, t in moved.items():
                    if targets.count(t) == 1:
                        o[t] = ox[a]
            o = tuple(o)
        return o

    def readout_perm(self, n) -> Optional[Tuple[int, ...]]:
        """The permutation that puts the position map of ``n`` (batch, then its position axes in
        tensor order) in the input's (row, column, ...) order (SPEC §8 "Read-out"); None when it
        already is, or when the positions of ``n`` cannot all be traced to input positions."""
        if not self.is_tensor(n):
            return None
        cax, o = self.caxes(n), self.origin(n)
        pos = [a for a in range(1, len(o)) if a not in cax]
        src = [o[a] for a in pos]
        inpos = set(range(1, len(self.shape(self.input)))) - set(self.caxes(self.input))
        if len(pos) < 2 or not all(s in inpos for s in src) or len(set(src)) != len(src):
            return None
        order = sorted(range(len(pos)), key=lambda i: src[i])
        return None if order == list(range(len(pos))) else (0,) + tuple(1 + i for i in order)

    def position_shape(self, n) -> Tuple[int, ...]:
        """The sizes of ``n``'s position map as it is read out (input orientation, no batch)."""
        sp = [s for i, s in enumerate(self.shape(n)) if i != 0 and i not in self.caxes(n)]
        perm = self.readout_perm(n)
        return tuple(sp[p - 1] for p in perm[1:]) if perm else tuple(sp)

    def unsupported(self, node, reason):
        raise UnsupportedOpError(
            f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)!s}): {reason}")

    def _refuse_non_tensor(self, n, lay):
        """A non-tensor (or attribute-of) node on the relevance path: name the op that produced
        the value (``torch.sort(...).values``, ``torch.fft.fft(...).real``) and how to teach it."""
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if n.op == "call_function" and n.target in (getattr, operator.getitem) and src is not None \
                and src.op != "placeholder":
            meta = src.meta.get("tensor_meta")
            typ = src.meta.get("type", object)
            kind = (f"a {meta.dtype} tensor" if isinstance(meta, TensorMetadata) else
                    f"a tuple ({typ.__module__}.{typ.__name__})" if issubclass(typ, tuple) else
                    f"a {typ.__name__}")
            part = f".{n.args[1]}" if n.target is getattr else f"[{n.args[1]!r}]"
            op = src.target if isinstance(src.target, str) else \
                f"{getattr(src.target, '__module__', '')}.{getattr(src.target, '__name__', src.target)}" \
                .replace("torch._C._fft.fft_", "torch.fft.")
            raise UnsupportedOpError(
                f"srd_fx has no rule for {op} (node {src.name!r}) on the path to activation layer "
                f"{lay.name!r}: it returns {kind}, of which node {n.name!r} takes {part}. Move the "
                "computation into a module of its own and register a rule for that module, e.g.\n"
                "    import srd_fx\n"
                "    from srd_fx.rules import Affine, Activation\n"
                "    srd_fx.register_rule(MyOp, Affine())        # linear in its input, keeps positions\n"
                "    srd_fx.register_rule(MyOp, Activation(fn))  # an element-wise nonlinearity\n"
                "(a registered module is a leaf of the trace; docs/rules.md: the Rule contract and one "
                "worked example of each kind of op).")
        self.unsupported(n, "a non-tensor value on the relevance path")

    # ------------------------------------------------------------------ layers and blocks --
    def _layers(self) -> List[Layer]:
        # main path: backward from L through main inputs
        main, stack = set(), [self.L]
        while stack:
            n = stack.pop()
            if n in main:
                continue
            main.add(n)
            stack.extend(self.main_inputs(n))
        self.main = main
        acts = [n for n in self.nodes if n in main and isinstance(self.rule.get(n), R.Activation)]
        for a in acts:
            r = self.rule[a]
            if r.name and "softmax" in r.name.lower():
                self.unsupported(a, "softmax on the main path (only a softmax gate is supported)")
        act_set = set(acts)
        layers = []
        for a in acts:
            ins = self.main_inputs(a)
            if not ins:
                continue
            if len(ins) > 1:
                self.unsupported(a, f"an element-wise nonlinearity of {len(ins)} input-dependent tensors "
                                    f"({', '.join(i.name for i in ins)}) is not an activation layer of one "
                                    "pre-activation; register a rule for it")
            layers.append(Layer(name=a.name, node=a, pre=ins[0]))
        if self.L not in act_set:
            layers.append(Layer(name=self.L.name, node=self.L, pre=self.L, virtual=True))
        boundary = act_set | {self.input}
        for lay in layers:
            block, inputs, seen, stack = [], [], set(), [lay.pre]
            while stack:
                n = stack.pop()
                if n in seen:
                    continue
                seen.add(n)
                if n in boundary and not (lay.virtual and n is lay.pre and n not in act_set):
                    inputs.append(n)
                    continue
                rule = self.rule.get(n)
                if rule is None:
                    raise UnsupportedOpError(
                        f"srd_fx has no rule for node {n.name!r} ({n.op}, target "
                        f"{n.target if isinstance(n.target, str) else getattr(n.target, '__qualname__', n.target)!s}"
                        f"{', type ' + type(self.modules[n.target]).__name__ if n.op == 'call_module' else ''}) "
                        f"on the path to activation layer {lay.name!r}.\n" + how_to_register(n, self.modules))
                if rule.kind == "meta" or not self.is_tensor(n):
                    self._refuse_non_tensor(n, lay)
                if rule.gate_args and len(
                        [a for a in self.main_inputs(n) if any(a is n.args[i] for i in rule.gate_args
                                                               if i < len(n.args))]) > 1:
                    if rule.divisor_only:
                        self.unsupported(n, "a division by an input-dependent tensor that is neither a gate "
                                            "nor a normalisation statistic (SRD's blocks must be affine "
                                            "in their inputs); register a rule for it")
                    self.unsupported(n, "a product of two input-dependent tensors with no identifiable "
                                        "gate (sigmoid/hardsigmoid/softmax output or a (B, C, 1, 1) "
                                        "squeeze branch) and no uniform rule; register a rule for it")
                block.append(n)
                stack.extend(self.main_inputs(n))
            block.sort(key=self.order.get)
            inputs.sort(key=self.order.get)
            lay.block, lay.inputs = block, inputs
            for n in block + inputs + [lay.pre]:
                self.caxes(n)
            self._check_unlabelled(lay)
        return layers

    def _check_unlabelled(self, lay):
        """Tensors whose channels are folded into the batch axis or mixed with positions may only
        be rearranged (reshape, permute, copies) until a reshape separates them again."""
        from srd_fx.rules.elementwise import Identity
        from srd_fx.rules.shape import Fold, GetItem, Permute, Reshape, Unfold, Unsqueeze
        for n in lay.block + lay.inputs + [lay.pre]:
            if (n is lay.pre or n in lay.inputs) and n in self.folded:
                self.unsupported(n, f"activation layer at a tensor {self.shape(n)} whose batch axis holds channels "
                                    "(attention heads folded into it): its PFVs are split across batch rows, so it "
                                    "is no activation layer of SRD. Reshape the heads back into the channel axis "
                                    "before the nonlinearity, or register a rule for the module that holds it")
            if self.caxes(n) != () and (n in lay.inputs or all(self.caxes(i) != () for i in self.main_inputs(n))):
                continue
            r = self.rule.get(n)
            if n is lay.pre or n in lay.inputs or not isinstance(r, (Reshape, Unsqueeze, Permute, Identity, Unfold,
                                                                        Fold, GetItem)):
                shape = next((self.shape(i) for i in [n] + self.main_inputs(n) if self.caxes(i) == ()), None)
                self.unsupported(n, f"the tensor {shape} has its channels folded into the batch axis or "
                                    "mixed with positions (after a reshape), and this op is not a reshape or permute "
                                    "that separates them again; register a rule for the module that does this")

    def layer_of(self, n) -> Optional[Layer]:
        for lay in self.layers:
            if lay.node is n:
                return lay
        return None

    def head_nodes(self) -> List[fx.Node]:
        """Nodes after L that compute the logits (L excluded)."""
        desc = nx.descendants(self.nx, self.L)
        anc = nx.ancestors(self.nx, self.logits_node) | {self.logits_node}
        before = nx.ancestors(self.nx, self.L)
        for n in anc:
            if self.dep.get(n) and n not in desc and n is not self.L and n not in before \
                    and n is not self.input:
                raise UnsupportedOpError(
                    f"the head (after the encoder output {self.L.name!r}) also uses {n.name!r}, which "
                    "is not computed from L. Pass encoder_output= a node that every path to the logits "
                    "goes through.")
        return [n for n in self.nodes if n in desc and n in anc]
