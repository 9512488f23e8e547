"""Initial relevance at the encoder output L (SPEC §2, Eq. 4)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import InputError


def resolve_target(logits: torch.Tensor, target, check_values: bool = True) -> torch.Tensor:
    """None -> predicted class; int -> the same class for every sample; LongTensor (B,).

    ``check_values=False``: a target tensor's classes are not compared with the number of classes
    here (that reads the device; the generated code checks them with the map, in one sync)."""
    B, K = logits.shape[0], logits.shape[-1]
    if target is None:
        return logits.argmax(dim=-1)
    if isinstance(target, int):
        if not 0 <= target < K:
            raise InputError(f"target class out of range: got {target}, the model has {K} classes (0..{K - 1})")
        return torch.full((B,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor):
        if target.dim() == 0:
            target = target.expand(B)
        if target.shape != (B,) or target.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
            raise InputError(f"target must be an int or an integer tensor of shape ({B},), got "
                             f"{target.dtype} {tuple(target.shape)}")
        t = target.to(device=logits.device, dtype=torch.long)
        if not check_values:
            return t
    else:
        raise InputError(f"target must be None, an int or a LongTensor of shape ({B},), got {type(target).__name__}")
    if (t < 0).any() or (t >= K).any():
        raise InputError(f"target class out of range: got {t.tolist()}, the model has {K} classes (0..{K - 1})")
    return t


def select_output(out, selector):
    """Apply ``output_selector`` (a callable, a dict key or a tuple index) to the model output."""
    if selector is None:
        y = out
    elif callable(selector):
        y = selector(out)
    else:
        y = out[selector]
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise InputError(f"the model output (after output_selector) must be a logits tensor (B, K), got "
                         f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}; pass output_selector= "
                         "(a callable, key or index) to srd_fx.compile")
    return y


class _Selected(torch.nn.Module):
    def __init__(self, head, selector):
        super().__init__()
        self.head, self.selector = head, selector

    def forward(self, A):
        return select_output(self.head(A), self.selector)


def extract_head(info, selector=None) -> torch.nn.Module:
    head = _extract_head(info)
    return head if selector is None or info.logits_node is not info.output else _Selected(head, selector)


def _extract_head(info) -> fx.GraphModule:
    """The part of the model after L as its own GraphModule ``head(A) -> logits``."""
    g = fx.Graph()
    env = {info.L: g.placeholder("A")}
    for n in info.head_nodes():
        env[n] = g.node_copy(n, lambda a: env[a] if a in env else _const(g, env, a))
    target = info.output.args[0] if info.logits_node is info.output else info.logits_node
    g.output(fx.node.map_arg(target, lambda a: env[a] if a in env else _const(g, env, a)))
    return fx.GraphModule(info.gm, g, "SRDHead")


def _const(g, env, a):
    """Copy a node the head uses that is not downstream of L: a parameter, or an input-independent
    expression of parameters (e.g. RmsNorm's ``weight.reshape(...)``), copied with its arguments."""
    if a.op == "get_attr":
        env[a] = g.get_attr(a.target)
        return env[a]
    if a.op in ("call_function", "call_method", "call_module") and not _depends_on_input(a):
        env[a] = g.node_copy(a, lambda b: env[b] if b in env else _const(g, env, b))
        return env[a]
    raise KeyError(f"the head (the part of the model after the encoder output L) uses node {a.name!r}, "
                   "which is computed from the input before L; pass encoder_output= a later node")


def _depends_on_input(n) -> bool:
    seen, todo = set(), [n]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "placeholder":
            return True
        todo.extend(m.all_input_nodes)
    return False


def _spatial(A, caxes):
    return tuple(d for d in range(1, A.dim()) if d not in caxes)


def gradcam(head, A, target, caxes, neuron=False, segments=None):
    """``(R^L, logits)``: R^L_i = max(Phi^c_i - mean_c' Phi^c'_i, 0) with Grad-CAM weights (Eq. 4),
    and the logits the head computes from A on the way (the model's own, so the forward pass
    does not run the head a second time).

    One vector-Jacobian product of the head with (onehot(c) - 1/K) gives both terms at once.
    ``segments``: L packs several encoder outputs along axis 1 (``(start, stop)`` each), and the
    Grad-CAM weights are the mean over each one's positions.
    unit="neuron": each neuron k of a position with Phi_i > 0 gets its term alpha_k A_ik (the
    z-rule through Phi's linear combination), so the neuron relevances of i sum to R^L_i."""
    if torch.is_grad_enabled() and A.requires_grad:  # the map will be differentiated (Sec. 4.3)
        with torch.enable_grad():
            logits = head(A)
        vjp = None
    else:  # torch.func.vjp: no autograd graph of the caller's, and torch.compile traces it whole
        logits, vjp = torch.func.vjp(head, A.detach() if A.requires_grad else A)
    K = logits.shape[-1]
    # one_hot(t) - 1/K, without F.one_hot (which reads t's range back from the device); adding 1
    # at the target gives the same rounding as 1 - 1/K in the logits' dtype.  A class out of range
    # is clamped here (no device-side assert) and refused by the call's value check; the
    # predicted class (no target) is in range.
    if target is None:
        idx = logits.argmax(dim=-1, keepdim=True)
    else:
        idx = resolve_target(logits, target, check_values=False).clamp(0, K - 1)[:, None]
    w = torch.full_like(logits, -1.0 / K).scatter_(1, idx, 1.0, reduce="add")
    if vjp is None:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(logits, A, w, create_graph=True)
    else:
        (grad,) = vjp(w)
    sp = _spatial(A, caxes)
    if A.dtype in (torch.float16, torch.bfloat16):  # maps are float32 for half-precision models
        A, grad = A.float(), grad.float()
    if segments is not None:   # several encoder outputs packed along axis 1: a mean per tensor
        alpha = torch.cat([grad[:, a:b].mean(dim=1, keepdim=True).expand(-1, b - a, -1) for a, b in segments], 1)
    else:
        alpha = grad.mean(dim=sp, keepdim=True) if sp else grad
    terms = alpha * A
    phi = terms.sum(dim=caxes, keepdim=True)
    if neuron:
        return terms * (phi > 0).to(terms.dtype), logits
    return torch.relu(phi), logits


def ones(A, caxes, neuron=False, logits=None, target=None):
    """R^L_i = 1 (the attack setting of Sec. 4.3); unit="neuron": 1/C per neuron.  The map does
    not depend on the target, which is still checked against the logits (its type and shape here,
    a tensor's classes with the map's values in the call's one check)."""
    if logits is not None and target is not None:
        resolve_target(logits, target, check_values=False)
    shape = list(A.shape)
    for a in caxes:
        shape[a] = 1
    r = torch.ones(shape, device=A.device, dtype=torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype)
    if neuron:
        C = A.numel() // r.numel()
        r = r.expand(A.shape) / C
    return r


def user_head(fn, A, logits, target, caxes, neuron=False):
    """A callable head ``(A, logits, target) -> R^L``: shape (B, H, W) — or, with
    unit="neuron", the shape of A (one relevance per neuron).  A (and so the map) is in the
    layout the model computes L in; the target is checked against the logits (a tensor's classes
    with the map's values, in the call's one check) and passed as given."""
    if target is not None:
        resolve_target(logits, target, check_values=False)
    r = fn(A, logits, target)
    if not isinstance(r, torch.Tensor):
        raise InputError(f"the head must return a tensor, got {type(r).__name__}")
    if neuron and tuple(r.shape) == tuple(A.shape):
        return r
    shape = list(A.shape)
    for a in caxes:
        shape[a] = 1
    want = tuple(s for i, s in enumerate(shape) if i not in caxes)
    if tuple(r.shape) != want:
        raise InputError(f"the head returned a map of shape {tuple(r.shape)}; expected {want}"
                         + (f" or {tuple(A.shape)}" if neuron else ""))
    if neuron:
        raise InputError(f"with unit='neuron' the head must return one relevance per neuron, "
                         f"shape {tuple(A.shape)}")
    return r.reshape(shape)
