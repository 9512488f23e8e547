"""Targeted explanation manipulation (Dombrowski et al. 2019; SPEC.md §6, paper Sec. 4.3).

Given an image ``x_org`` and a target image ``x_target``, find ``x_adv = x_org + delta`` with
``||delta||_inf <= 8/255`` and ``x_adv`` in the valid pixel range that minimises

    lambda1 * MSE(phi(x_adv), phi(x_target)) + lambda2 * MSE(F(x_adv), F(x_org))

(``phi``: the explanation, absolute values summed over colour channels and normalised to sum 1
per image, as in Dombrowski et al.; ``F``: the logits; MSE = mean over pixels / logits).

How each method is attacked (``METHODS``: the methods of the one registry,
``srd_fx.methods.registry``, that have an ``attack`` factory, here the :class:`Attack` subclasses):

* ``srd``: SRD's own compiled module (``srd_fx.compile(model, head="ones")``) on the original
  network; its map is a smooth function of the input almost everywhere even for ReLU networks,
  so no surrogate is needed (method ``srd_softplus`` attacks it on the softplus copy instead).
* ``gradient``, ``input_x_gradient``, ``guided_backprop``, ``integrated_gradients``:
  differentiable re-computations (``torch.autograd.grad(create_graph=True)``) of exactly what
  captum's ``Saliency``, ``InputXGradient``, ``GuidedBackprop`` and ``IntegratedGradients``
  return (checked against captum in ``tests/harness/test_robustness.py``), evaluated on a copy of the
  network whose ReLUs are replaced by ``softplus(beta)`` (an fx rewrite, :func:`replace_relu`),
  because the gradient of a ReLU network's gradient map is zero almost everywhere.  Guided
  backprop runs two passes (an ordinary one recording pre-activations, a guided one using
  them) so that the map's own derivative follows the true forward function (``_GuidedFn``).
* ``lrp_zplus``: zennit's LRP with the z+ rule on every convolution and linear layer (batch-norm
  folded into the preceding convolution, residual additions routed through zennit's ``Sum``
  module), on the softplus copy; zennit's hooks build a differentiable graph when the
  attribution gradient is taken with ``create_graph=True`` *and* the output one-hot requires
  grad (otherwise the top layer's hook silently drops its dependence on the input).

All these second-order gradients are checked against finite differences in the tests.
The maps *reported* (``AttackResult.maps``) are those of the original network, computed by the
libraries themselves (captum, zennit, srd_fx).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError, NonFiniteError
from .registry import REGISTRY, Method, register

__all__ = ["METHODS", "Attack", "AttackResult", "manipulate", "replace_relu", "softplus_copy",
           "lrp_network", "lrp_zplus", "make_method", "similarity", "explain"]

_RELU_FNS = (F.relu, torch.relu)


# ------------------------------------------------------------------------------------------
# fx rewrites
# ------------------------------------------------------------------------------------------


def _is_relu(node: fx.Node, modules) -> bool:
    from srd_fx import rules
    rule = rules.lookup(node, modules)
    return isinstance(rule, rules.Activation) and rule.fn in _RELU_FNS


def _is_inplace(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").endswith("_") or bool(node.kwargs.get("inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return False


def replace_relu(model: nn.Module, make: Callable[[], nn.Module], *,
                 gm: Optional[fx.GraphModule] = None) -> fx.GraphModule:
    """Trace ``model`` (``srd_fx.compiler.trace.trace``) and replace every ReLU node — module
    (``nn.ReLU``), functional (``F.relu``, ``torch.relu``, in-place forms) or tensor method
    (``x.relu()``, ``x.relu_()``) — by a call to a fresh module ``make()``.

    In-place forms are honoured: later uses of the activation's input are redirected to the new
    (out-of-place) output.  The returned GraphModule shares the model's parameters."""
    from ..compiler.trace import trace
    gm = trace(model) if gm is None else gm
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    renamed = {}
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules):
            continue
        src = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
        name = f"_attack_act_{count}"
        count += 1
        gm.add_submodule(name, make())
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (src,))
        inplace = _is_inplace(node, modules)
        node.replace_all_uses_with(new)
        if inplace and isinstance(src, fx.Node):
            for user in list(src.users):
                if user is not new and order.get(user, math.inf) > order[node]:
                    user.replace_input_with(src, new)
        renamed[node.name] = new.name
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.n_replaced_relu = count
    gm.renamed_nodes = renamed  # old activation node name -> new node name
    return gm.eval()


def softplus_copy(model: nn.Module, beta: float) -> fx.GraphModule:
    """The network with every ReLU replaced by ``softplus(beta)`` (Dombrowski et al. 2019)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return replace_relu(model, lambda: nn.Softplus(beta=beta))


def _act(x, beta):
    return F.relu(x) if beta is None else F.softplus(x, beta=beta)


class _GuidedFn(torch.autograd.Function):
    """Guided-backprop activation fed with the pre-activation ``z`` of a separate, ordinary
    forward pass.  Forward: ``act(x)`` (x and z hold the same values).  Backward: the guided
    rule ``act'(z) * clamp(g, min=0)`` for ``x`` and nothing for ``z``.

    Why two inputs: differentiating the guided map (a gradient taken with ``create_graph=True``)
    must follow the *true* derivative of the forward activations.  With one input autograd
    would differentiate the forward values through this same guided backward; here the only
    dependence of the map on the image is through ``z``, whose graph is the ordinary
    softplus (or ReLU) forward pass."""

    @staticmethod
    def forward(ctx, x, z, beta):
        ctx.save_for_backward(z)
        ctx.beta = beta
        return _act(x, beta)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        d = (z > 0).to(z.dtype) if ctx.beta is None else torch.sigmoid(ctx.beta * z)
        return d * g.clamp(min=0), None, None


class _Keyed(nn.Module):
    """An activation with a slot ``store[key]`` shared with its twin in the other network."""

    def __init__(self, beta, store, key):
        super().__init__()
        self.beta, self.key = beta, key
        self.store = store


class _Record(_Keyed):
    """Ordinary activation that records its input (the pre-activation) in ``store[key]``."""

    def forward(self, x):
        self.store[self.key] = x
        return _act(x, self.beta)


class _GuidedFromRecord(_Keyed):
    """Guided activation reading the pre-activation its twin ``_Record`` stored."""

    def forward(self, x):
        return _GuidedFn.apply(x, self.store[self.key], self.beta)


def _keyed(cls, beta, store):
    counter = iter(range(1 << 30))
    return lambda: cls(beta, store, next(counter))


def _fold_batchnorm(gm: fx.GraphModule) -> None:
    """Fold eval batch-norm modules into the convolution that feeds them (when that
    convolution has no other user), with ``torch.nn.utils.fusion.fuse_conv_bn_eval``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules[src.target], nn.Conv2d)):
            continue
        fused = fuse_conv_bn_eval(modules[src.target], modules[node.target])
        name = src.target.replace(".", "_") + "_bnfold"
        gm.add_submodule(name, fused)
        src.target = name
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _route_adds_through_sum(gm: fx.GraphModule, example: torch.Tensor) -> int:
    """Replace ``a + b`` of two same-shaped tensors by ``zennit.layer.Sum()(stack([a, b], -1))``
    so that zennit's ``Norm`` rule splits relevance between the branches (its canonizers do the
    same for torchvision ResNets)."""
    from torch.fx.passes.shape_prop import ShapeProp
    from zennit.layer import Sum
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    count = 0
    for node in list(gm.graph.nodes):
        is_add = ((node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd))
                  or (node.op == "call_method" and node.target in ("add", "add_")))
        if not is_add or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        ta, tb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
        if ta is None or tb is None or getattr(ta, "shape", None) != getattr(tb, "shape", None):
            continue
        name = f"_lrp_sum_{count}"
        count += 1
        gm.add_submodule(name, Sum(dim=-1))
        with gm.graph.inserting_before(node):
            st = gm.graph.call_function(torch.stack, ((a, b),), {"dim": -1})
            new = gm.graph.call_module(name, (st,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return count


def lrp_network(model: nn.Module, example: torch.Tensor, beta: Optional[float] = None) -> fx.GraphModule:
    """The network prepared for zennit: ReLUs as (out-of-place) modules (``softplus(beta)``
    when ``beta`` is given), batch-norm folded into convolutions, residual additions through
    ``zennit.layer.Sum``.  Computes the same function as ``model``."""
    make = (lambda: nn.ReLU()) if beta is None else (lambda: nn.Softplus(beta=beta))
    gm = replace_relu(model, make)
    _fold_batchnorm(gm)
    # shapes of a batch of two: a parameter broadcast over the batch (a ViT's position embedding,
    # (1, N, C)) is then not taken for a branch of the same shape
    _route_adds_through_sum(gm, example[:1].detach().expand(2, *example.shape[1:]))
    gm.delete_all_unused_submodules()  # drops the folded batch-norms from this copy only
    return gm.eval()


def lrp_composite():
    """LRP z+: zennit's ZPlus rule on every convolution and linear layer; activations pass
    relevance through; average pooling and ``Sum`` use zennit's Norm rule; max-pooling routes
    relevance to the arg-max (its gradient)."""
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import ZPlus
    from zennit.types import Linear
    return LayerMapComposite(layer_map=layer_map_base() + [(Linear, ZPlus())])


def lrp_zplus_map(net: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """LRP z+ of ``net`` (a network prepared by :func:`lrp_network`) for one class per sample:
    zennit's rules (:func:`lrp_composite`), the relevance at the input (B, C, H, W).  With
    ``create_graph`` the map is differentiable in ``x`` (the attack)."""
    from zennit.attribution import Gradient as ZGradient
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    with ZGradient(model=net, composite=lrp_composite(), create_graph=create_graph):
        logits = net(x)
        onehot = torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1.0)
        # zennit's hooks build a graph only where the incoming gradient requires grad
        # (create_graph=grad_output.requires_grad): a constant one-hot would silently drop
        # the top layer's dependence on x from the map's derivative
        onehot.requires_grad_(create_graph)
        (rel,) = torch.autograd.grad(logits, x, grad_outputs=onehot, create_graph=create_graph)
    return rel


def lrp_zplus(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LRP z+ of ``model`` (B, C, H, W): the one implementation, used by the evaluation's
    baselines (``srd_fx.eval.baselines``) and reported by the attack."""
    return lrp_zplus_map(lrp_network(model, x, None), x, target).detach()


# ------------------------------------------------------------------------------------------
# explanation methods
# ------------------------------------------------------------------------------------------


def _channel_abs_sum(a: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) attribution -> (B, H, W) absolute map (|.| summed over channels)."""
    return a.abs().sum(1) if a.dim() == 4 else a.abs()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """A detached copy that requires grad (what captum and zennit expect)."""
    return x.detach().clone().requires_grad_(True)


def _select(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target.view(-1, 1)).sum()


class Attack:
    """The attack's hooks for one explanation method (:class:`srd_fx.methods.registry.AttackHooks`),
    built per model by its registry entry's ``attack(model, example, beta)`` factory (this class).

    ``attack(x, target) -> (map (B,H,W) >= 0, logits)``: differentiable in ``x``, on the network
    the attack uses (the softplus copy for gradient methods);
    ``report(x, target) -> map (B,H,W) >= 0``: the library's map on the original network."""

    name = "?"
    label = "?"

    def __init__(self, model: nn.Module, example: torch.Tensor, beta: Optional[float]):
        self.model = model
        self.beta = beta

    def attack(self, x, target):  # pragma: no cover - abstract
        raise NotImplementedError

    def report(self, x, target):  # pragma: no cover - abstract
        raise NotImplementedError


class _GradientFamily(Attack):
    """Shared plumbing: ``self.net`` is the attacked network (softplus copy or the model)."""

    def __init__(self, model, example, beta):
        super().__init__(model, example, beta)
        self.net = softplus_copy(model, beta) if beta is not None else model

    def _grad(self, net, x, target, create_graph=True):
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        logits = net(x)
        (g,) = torch.autograd.grad(_select(logits, target), x, create_graph=create_graph)
        return g, logits


class Gradient(_GradientFamily):
    name, label = "gradient", "Gradient"

    def attack(self, x, target):
        g, logits = self._grad(self.net, x, target)
        return _channel_abs_sum(g), logits

    def report(self, x, target):
        from captum.attr import Saliency
        return _channel_abs_sum(Saliency(self.model).attribute(_leaf(x), target=target, abs=True))


class InputXGradient(_GradientFamily):
    name, label = "input_x_gradient", "Input×Gradient"

    def attack(self, x, target):
        g, logits = self._grad(self.net, x, target)
        return _channel_abs_sum(x * g), logits

    def report(self, x, target):
        from captum.attr import InputXGradient as IxG
        return _channel_abs_sum(IxG(self.model).attribute(_leaf(x), target=target))


class GuidedBackprop(_GradientFamily):
    """Guided backprop: the gradient with negative gradients zeroed at every ReLU.  Attacked
    through two passes over the softplus copy: an ordinary one that records pre-activations
    (and gives the logits), and a guided one whose backward uses them (see ``_GuidedFn``)."""

    name, label = "guided_backprop", "Guided Backprop"

    def __init__(self, model, example, beta):
        Attack.__init__(self, model, example, beta)
        self._store: Dict[int, torch.Tensor] = {}
        self.net = replace_relu(model, _keyed(_Record, beta, self._store))
        self.guided = replace_relu(model, _keyed(_GuidedFromRecord, beta, self._store))
        # captum overrides the backward of nn.ReLU modules only: give it a module-form copy
        self.relu_net = replace_relu(model, lambda: nn.ReLU())

    def attack(self, x, target):
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        self._store.clear()
        logits = self.net(x)
        out = self.guided(x)
        (g,) = torch.autograd.grad(_select(out, target), x, create_graph=True)
        self._store.clear()
        return _channel_abs_sum(g), logits

    def report(self, x, target):
        from captum.attr import GuidedBackprop as GB
        return _channel_abs_sum(GB(self.relu_net).attribute(_leaf(x), target=target))


class IntegratedGradients(_GradientFamily):
    """Zero baseline, captum's Gauss-Legendre rule with ``n_steps`` points."""

    name, label = "integrated_gradients", "Integrated Gradients"
    n_steps = 8

    def _ig(self, net, x, target, create_graph):
        from captum.attr._utils.approximation_methods import approximation_parameters
        step_fn, alpha_fn = approximation_parameters("gausslegendre")
        steps, alphas = step_fn(self.n_steps), alpha_fn(self.n_steps)
        B = x.shape[0]
        path = torch.cat([a * x for a in alphas])             # baseline 0
        if not create_graph:
            path = path.detach().requires_grad_(True)
        out = net(path)
        tgt = target.repeat(len(alphas))
        (g,) = torch.autograd.grad(_select(out, tgt), path, create_graph=create_graph)
        g = g.view(len(alphas), B, *x.shape[1:])
        w = torch.tensor(steps, dtype=x.dtype, device=x.device).view(-1, *([1] * x.dim()))
        return x * (w * g).sum(0)

    def attack(self, x, target):
        return _channel_abs_sum(self._ig(self.net, x, target, True)), self.net(x)

    def report(self, x, target):
        from captum.attr import IntegratedGradients as IG
        a = IG(self.model).attribute(_leaf(x), baselines=0.0, target=target, n_steps=self.n_steps,
                                      method="gausslegendre")
        return _channel_abs_sum(a)


class LRPZPlus(Attack):
    name, label = "lrp_zplus", "LRP z+"

    def __init__(self, model, example, beta):
        super().__init__(model, example, beta)
        self.net = lrp_network(model, example, beta)
        self.orig = lrp_network(model, example, None) if beta is not None else self.net
        self.plain = softplus_copy(model, beta) if beta is not None else model

    def attack(self, x, target):
        rel = lrp_zplus_map(self.net, x, target, create_graph=True)
        # the logit term's gradient must be the true one: a plain forward outside zennit's hooks
        return _channel_abs_sum(rel), self.plain(x)

    def report(self, x, target):
        return _channel_abs_sum(lrp_zplus_map(self.orig, x.detach(), target).detach())


class LRPZPlusReLU(LRPZPlus):
    """LRP z+ attacked on the original (ReLU) network directly: its map is a ratio of
    activations, not piecewise constant, so it has a usable gradient without a surrogate.  On
    the digit-scene ResNet this is the stronger attack: the softplus copy's LRP map resembles
    the ReLU map but its input gradient is orders of magnitude larger and changes on a 1e-4
    scale, too rough for Adam at lr 1e-3 (``experiments/attack_lrp_surrogate.py``)."""

    name, label = "lrp_zplus_relu", "LRP z+ (ReLU-attacked)"

    def __init__(self, model, example, beta):  # the original network: no softplus beta
        super().__init__(model, example, None)


class SRD(Attack):
    """SRD-input with head="ones" (Sec. 4.3), through the compiled, differentiable explainer."""

    name, label = "srd", "SRD (ours)"
    surrogate = False

    def __init__(self, model, example, beta):
        import srd_fx
        super().__init__(model, example, beta)
        self.explainer = srd_fx.compile(model, head="ones", example_input=example[:1].detach())
        if self.surrogate and beta is not None:
            sp = softplus_copy(model, beta)
            L = self.explainer.encoder_output
            self.attacked = srd_fx.compile(sp, head="ones", encoder_output=sp.renamed_nodes.get(L, L),
                                           example_input=example[:1].detach())
        else:
            self.attacked = self.explainer

    def attack(self, x, target):
        out = self.attacked(x, target)
        return out.saliency.abs(), out.logits

    def report(self, x, target):
        with torch.no_grad():
            return self.explainer(x.detach(), target).saliency.abs()


class SRDSurrogate(SRD):
    name, label = "srd_softplus", "SRD (softplus-attacked)"
    surrogate = True


class AttnLRP(Attack):
    """LXT's AttnLRP (:mod:`srd_fx.eval.lxt_patches`: LXT's patches and zennit rules on a timm token
    model).  Reported: LXT's map ``|x * grad|`` with the patches and the Gamma rules.  Attacked:
    the same map without the zennit Gamma rules (LXT's patches only, so linear layers pass the
    plain gradient, LXT's setting for language models), through the graph autograd records with
    ``create_graph=True`` on the original network (GELU networks need no surrogate).  The Gamma
    rules cannot be attacked: LXT's zennit patch sets ``requires_grad`` on the incoming gradient,
    which torch refuses once that gradient is part of a graph.  In the graph LXT's custom autograd
    functions (identity rule, norm) keep the ratios they saved in the forward pass as constants, so
    the attack follows LXT's own backward rather than the exact derivative of the map."""

    name, label = "attnlrp", "AttnLRP (LXT)"
    variant = "attnlrp"

    def __init__(self, model, example, beta):  # the original network: no softplus beta
        super().__init__(model, example, None)

    def attack(self, x, target):
        from ..eval import lxt_patches
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with lxt_patches.patched(self.variant):
            logits = self.model(x)
            (g,) = torch.autograd.grad(_select(logits, target), x, create_graph=True)
        return _channel_abs_sum(x * g), logits

    def report(self, x, target):
        from ..eval import lxt_patches
        return _channel_abs_sum(lxt_patches.relevance(self.model, x, target, self.variant))


#: the attack's methods: the registered methods with an ``attack`` factory (srd_fx.methods.registry)
METHODS = REGISTRY.view("attack")
for _cls, _source in ((Gradient, "captum"), (InputXGradient, "captum"), (GuidedBackprop, "captum"),
                      (IntegratedGradients, "captum"), (LRPZPlus, "zennit"), (LRPZPlusReLU, "zennit"),
                      (SRD, "srd_fx"), (SRDSurrogate, "srd_fx"), (AttnLRP, "lxt")):
    register(Method(_cls.name, None, "input", _source, label=_cls.label, attack=_cls), replace=True)
PAPER_METHODS = ("gradient", "input_x_gradient", "guided_backprop", "integrated_gradients",
                 "lrp_zplus", "srd")


def make_method(name: str, model: nn.Module, example: torch.Tensor, beta: Optional[float] = 10.0,
                ig_steps: int = 8) -> Attack:
    """Build the attack hooks of method ``name`` (one of ``METHODS``) for ``model``.  ``beta``:
    softplus sharpness of the attacked copy (None: attack the original network)."""
    m = METHODS[name].attack(model, example, beta)
    if isinstance(m, IntegratedGradients):
        m.n_steps = int(ig_steps)
    return m


def explain(method: Attack, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reported (original-network) absolute map, (B, H, W)."""
    return method.report(x, target)


# ------------------------------------------------------------------------------------------
# the attack
# ------------------------------------------------------------------------------------------


def _sum_normalise(m: torch.Tensor) -> torch.Tensor:
    return m / (m.sum(dim=(-2, -1), keepdim=True) + 1e-30)


def _max_normalise(m: torch.Tensor) -> torch.Tensor:
    return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-30)


@dataclass
class AttackResult:
    """Outcome of :func:`manipulate` for a batch of B pairs.

    x_adv (B,C,H,W); steps (B,) optimiser steps taken; stopped (B,) whether the MSE stop rule
    fired; linf (B,) achieved ``||x_adv - x_org||_inf``; loss (T+1, B) total loss at every
    evaluated iterate (NaN after a pair stopped); expl_loss / logit_loss the two terms (already
    multiplied by lambda1 / lambda2); stop_mse (T+1, B) the stop-rule MSE; attacked_logits_org /
    attacked_logits_adv the logits of the attacked network; logits_org / logits_adv those of the
    original model; maps: "org", "adv", "target" -> (B,H,W) reported maps (original network,
    absolute values); target_org / target_tgt the explained classes."""
    x_adv: torch.Tensor
    steps: torch.Tensor
    stopped: torch.Tensor
    linf: torch.Tensor
    loss: torch.Tensor
    expl_loss: torch.Tensor
    logit_loss: torch.Tensor
    stop_mse: torch.Tensor
    attacked_logits_org: torch.Tensor
    attacked_logits_adv: torch.Tensor
    logits_org: torch.Tensor
    logits_adv: torch.Tensor
    target_org: torch.Tensor
    target_tgt: torch.Tensor
    maps: Dict[str, torch.Tensor] = field(default_factory=dict)


def _as_bound(v, like: torch.Tensor) -> torch.Tensor:
    """A float, or a per-channel sequence/tensor, as a tensor broadcastable to (B, C, H, W)."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if t.dim() == 1:
        t = t.view(1, -1, 1, 1)
    return t


def _check_inputs(x_org, x_target, lo, hi):
    if not isinstance(x_org, torch.Tensor) or not isinstance(x_target, torch.Tensor):
        raise InputError("x_org and x_target must be tensors")
    if x_org.dim() != 4 or x_org.shape != x_target.shape:
        raise InputError(f"x_org and x_target must be batches of images of the same shape (B, C, H, W); "
                         f"got {tuple(x_org.shape)} and {tuple(x_target.shape)}")
    for nm, t in (("x_org", x_org), ("x_target", x_target)):
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{nm} contains NaN or infinite values")
        if (t < lo - 1e-5).any() or (t > hi + 1e-5).any():
            raise InputError(f"{nm} has values in [{t.min():.3g}, {t.max():.3g}], outside the valid input "
                             f"range given by clamp=({lo.min():.3g}.., {hi.max():.3g}..); pass clamp=(low, high) "
                             "matching your input normalisation (e.g. ((0 - mean) / std, (1 - mean) / std))")


def manipulate(model: nn.Module, method, x_org: torch.Tensor, x_target: torch.Tensor, *,
               lambda1: float = 1e11, lambda2: float = 1e6, lr: float = 1e-3, max_steps: int = 200,
               eps: float = 8 / 255, stop_mse: float = 1e-3, beta: Optional[float] = 10.0,
               clamp: Tuple[float, float] = (0.0, 1.0), ig_steps: int = 8,
               step_callback: Optional[Callable[[int, torch.Tensor], None]] = None) -> AttackResult:
    """Manipulate the explanation ``method`` of ``model`` at ``x_org`` towards that of
    ``x_target`` (SPEC.md §6).  Every pair in the batch is attacked independently.

    method:    a name in ``METHODS`` or the :class:`Attack` hooks built by :func:`make_method`;
    optimiser: Adam on the perturbation delta (lr ``lr``), delta projected after every step onto
               ``||delta||_inf <= eps`` and ``x_org + delta`` onto ``clamp = (low, high)``; ``eps``,
               ``low`` and ``high`` are floats or per-channel sequences, in the units of the model
               input (for a normalised input: ``(8/255) / std`` and ``((0 - mean) / std, (1 - mean) / std)``);
    stop:      a pair stops when the MSE between its max-normalised attacked map and the
               max-normalised target map is ``<= stop_mse`` or after ``max_steps`` steps;
    returns:   the iterate with the lowest loss among those evaluated before the pair stopped
               (so ``lambda2 * MSE(F(x_adv), F(x_org)) <= loss(delta=0)`` holds exactly)."""
    model.eval()
    # the attack takes second derivatives: attention through the SDPA math kernel, whose ops are
    # differentiable twice (the fused CPU kernels have no double backward); the same function
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return _manipulate(model, method, x_org, x_target, lambda1, lambda2, lr, max_steps, eps, stop_mse,
                           beta, clamp, ig_steps, step_callback)


def _manipulate(model, method, x_org, x_target, lambda1, lambda2, lr, max_steps, eps, stop_mse, beta, clamp,
                ig_steps, step_callback) -> AttackResult:
    lo, hi = _as_bound(clamp[0], x_org), _as_bound(clamp[1], x_org)
    eps_t = _as_bound(eps, x_org)
    _check_inputs(x_org, x_target, lo, hi)
    if (eps_t < 0).any() or max_steps < 0:
        raise InputError(f"eps and max_steps must be >= 0, got eps={eps}, max_steps={max_steps}")
    x_org = x_org.detach()
    x_target = x_target.detach()
    if isinstance(method, str):
        method = make_method(method, model, x_org, beta=beta, ig_steps=ig_steps)
    B = x_org.shape[0]
    with torch.no_grad():
        logits_org = model(x_org)
        target_org = logits_org.argmax(1)
        target_tgt = model(x_target).argmax(1)
    m_tgt, _ = method.attack(x_target.clone().requires_grad_(True), target_tgt)
    m_tgt = m_tgt.detach()
    tgt_sum, tgt_max = _sum_normalise(m_tgt), _max_normalise(m_tgt)
    att_logits_org = method.attack(x_org.clone().requires_grad_(True), target_org)[1].detach()

    delta = torch.zeros_like(x_org, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    best = torch.full((B,), math.inf, dtype=x_org.dtype)
    best_delta = torch.zeros_like(x_org)
    best_att_logits = att_logits_org.clone()
    active = torch.ones(B, dtype=torch.bool)
    stopped = torch.zeros(B, dtype=torch.bool)
    steps = torch.zeros(B, dtype=torch.long)
    hist = {k: [] for k in ("loss", "expl", "logit", "stop")}
    for t in range(max_steps + 1):
        x_adv = x_org + delta
        m, logits = method.attack(x_adv, target_org)
        l_expl = lambda1 * ((_sum_normalise(m) - tgt_sum) ** 2).mean(dim=(-2, -1))
        l_logit = lambda2 * ((logits - att_logits_org) ** 2).mean(dim=1)
        loss = l_expl + l_logit
        if not torch.isfinite(loss).all():
            raise NonFiniteError(f"the attack loss of {method.name} became non-finite at step {t} "
                                 f"(pairs {torch.nonzero(~torch.isfinite(loss)).flatten().tolist()}); "
                                 "try a smaller softplus beta or learning rate")
        with torch.no_grad():
            lv = loss.detach()
            smse = ((_max_normalise(m.detach()) - tgt_max) ** 2).mean(dim=(-2, -1))
            nan = torch.full_like(lv, math.nan)
            hist["loss"].append(torch.where(active, lv, nan))
            hist["expl"].append(torch.where(active, l_expl.detach(), nan))
            hist["logit"].append(torch.where(active, l_logit.detach(), nan))
            hist["stop"].append(torch.where(active, smse, nan))
            better = active & (lv < best)
            best = torch.where(better, lv, best)
            best_delta[better] = delta.detach()[better]
            best_att_logits[better] = logits.detach()[better]
            fire = active & (smse <= stop_mse)
            stopped |= fire
            active &= ~fire
            if t == max_steps or not active.any():
                break
            steps += active.long()
        opt.zero_grad(set_to_none=True)
        (loss * active.to(loss.dtype)).sum().backward()
        opt.step()
        with torch.no_grad():
            delta.copy_(torch.maximum(torch.minimum(delta, eps_t), -eps_t))
            delta.copy_(torch.maximum(torch.minimum(x_org + delta, hi), lo) - x_org)
            if step_callback is not None:
                step_callback(t, delta.detach())

    x_adv = (x_org + best_delta).detach()
    with torch.no_grad():
        logits_adv = model(x_adv)
    maps = {"org": method.report(x_org, target_org).detach(),
            "adv": method.report(x_adv, target_org).detach(),
            "target": method.report(x_target, target_tgt).detach()}
    for k, v in maps.items():
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"the reported {method.name} map '{k}' is not finite")
    return AttackResult(
        x_adv=x_adv, steps=steps, stopped=stopped, linf=(x_adv - x_org).abs().flatten(1).amax(1),
        loss=torch.stack(hist["loss"]), expl_loss=torch.stack(hist["expl"]),
        logit_loss=torch.stack(hist["logit"]), stop_mse=torch.stack(hist["stop"]),
        attacked_logits_org=att_logits_org, attacked_logits_adv=best_att_logits,
        logits_org=logits_org, logits_adv=logits_adv, target_org=target_org, target_tgt=target_tgt,
        maps=maps)


# ------------------------------------------------------------------------------------------
# similarity
# ------------------------------------------------------------------------------------------


def similarity(a: torch.Tensor, b: torch.Tensor) -> Dict[str, List[float]]:
    """SSIM (scikit-image, maps divided by their maximum, data_range 1) and Pearson correlation
    (scipy) between two batches of maps (B, H, W)."""
    import numpy as np
    from scipy.stats import pearsonr
    from skimage.metrics import structural_similarity
    A = _max_normalise(a.detach().double()).cpu().numpy()
    Bm = _max_normalise(b.detach().double()).cpu().numpy()
    ssim, pcc = [], []
    for u, v in zip(A, Bm):
        ssim.append(float(structural_similarity(u, v, data_range=1.0)))
        if np.std(u) == 0 or np.std(v) == 0:
            pcc.append(float("nan"))
        else:
            pcc.append(float(pearsonr(u.ravel(), v.ravel())[0]))
    return {"ssim": ssim, "pcc": pcc}
