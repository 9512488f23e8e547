"""Activation layers (SPEC §1): element-wise nonlinearities that end an affine block.

Module, functional, tensor-method and in-place forms are all registered.  Sigmoid,
hardsigmoid and softmax are ``gate_capable``: when their output scales another tensor they are
gates (constants of the block), not activation layers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Activation, register_rule

_MODULES = {
    nn.ReLU: F.relu, nn.ReLU6: F.relu6, nn.LeakyReLU: F.leaky_relu, nn.PReLU: None,
    nn.ELU: F.elu, nn.CELU: F.celu, nn.SELU: F.selu, nn.GELU: F.gelu, nn.SiLU: F.silu,
    nn.Mish: F.mish, nn.Hardswish: F.hardswish, nn.Hardtanh: F.hardtanh, nn.Softplus: F.softplus,
    nn.Tanh: torch.tanh, nn.Softsign: F.softsign, nn.Tanhshrink: F.tanhshrink,
}
_GATES = {nn.Sigmoid: torch.sigmoid, nn.Hardsigmoid: F.hardsigmoid}

for cls, fn in _MODULES.items():
    register_rule(cls, Activation(fn, name=cls.__name__))
for cls, fn in _GATES.items():
    register_rule(cls, Activation(fn, gate_capable=True, name=cls.__name__))
register_rule(nn.Softmax, Activation(F.softmax, gate_capable=True, name="Softmax"))

_FUNCTIONS = [
    (F.relu, F.relu), (torch.relu, torch.relu), (F.relu_, F.relu), (torch.relu_, torch.relu),
    (F.relu6, F.relu6), (F.leaky_relu, F.leaky_relu), (F.leaky_relu_, F.leaky_relu),
    (F.prelu, F.prelu), (torch.prelu, torch.prelu), (F.elu, F.elu), (F.elu_, F.elu),
    (F.celu, F.celu), (F.selu, F.selu), (torch.selu, torch.selu), (F.gelu, F.gelu),
    (F.silu, F.silu), (F.mish, F.mish), (F.hardswish, F.hardswish), (F.hardtanh, F.hardtanh),
    (F.hardtanh_, F.hardtanh), (F.softplus, F.softplus), (torch.tanh, torch.tanh),
    (F.tanh, torch.tanh), (torch.tanh_, torch.tanh), (F.softsign, F.softsign),
]
for f, oop in _FUNCTIONS:
    register_rule(f, Activation(oop, name=getattr(f, "__name__", str(f))))
for f in (torch.sigmoid, F.sigmoid, torch.sigmoid_, F.hardsigmoid):
    register_rule(f, Activation(torch.sigmoid if f is not F.hardsigmoid else F.hardsigmoid,
                                gate_capable=True, name=f.__name__))
for f in (F.softmax, torch.softmax):
    register_rule(f, Activation(F.softmax, gate_capable=True, name="softmax"))

# max(x, tau) with a learned or constant threshold tau (FRN's TLU): an element-wise nonlinearity
# of x; the analysis refuses it when both operands depend on the input.
for f in (torch.maximum, torch.fmax, torch.clamp_min):
    register_rule(f, Activation(f, name=f.__name__))
for meth in ("maximum", "fmax", "clamp_min"):
    register_rule("method:" + meth, Activation(getattr(torch, meth), name=meth))

for meth in ("relu", "relu_", "tanh", "tanh_"):
    register_rule("method:" + meth, Activation(getattr(torch, meth.rstrip("_")), name=meth))
for meth in ("sigmoid", "sigmoid_"):
    register_rule("method:" + meth, Activation(torch.sigmoid, gate_capable=True, name=meth))
register_rule("method:softmax", Activation(F.softmax, gate_capable=True, name="softmax"))


def _register_timm():
    """timm's own activation modules and functions (traced as leaves, see srd_fx.compiler.trace)."""
    try:
        from timm.layers import activations as A
    except Exception:  # timm not installed
        return
    gates = {"Sigmoid", "HardSigmoid", "sigmoid", "hard_sigmoid"}
    for name in ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish",
                 "PReLU", "GELU", "GELUTanh", "QuickGELU"):
        cls = getattr(A, name, None)
        if cls is not None:
            register_rule(cls, Activation(None, gate_capable=name in gates, name="timm." + name))
    for name in ("swish", "mish", "sigmoid", "tanh", "hard_sigmoid", "hard_swish", "hard_mish",
                 "gelu", "gelu_tanh", "quick_gelu"):
        fn = getattr(A, name, None)
        if fn is not None:
            register_rule(fn, Activation(fn, gate_capable=name in gates, name="timm." + name))
    try:
        from timm.layers import activations_me as M
        for name in ("SwishMe", "MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe"):
            cls = getattr(M, name, None)
            if cls is not None:
                register_rule(cls, Activation(None, gate_capable="Sigmoid" in name,
                                              name="timm." + name))
    except Exception:
        pass


_register_timm()
