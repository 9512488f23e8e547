"""srd_fx: compile a PyTorch CNN into its SRD (Sharing Ratio Decomposition) explainer.

    import srd_fx
    explainer = srd_fx.compile(model.eval())
    out = explainer(x)            # out.logits, out.saliency (B, H, W), out.relevance[...]
"""
__version__ = "0.1.0"

from srd_fx import rules  # noqa: F401  (populates the registry)
from srd_fx.rules import Activation, Affine, Rule, register_rule  # noqa: F401

from .compiler.explainer import Explainer, SRDOutput, compile  # noqa: F401
from .compiler.options import Options  # noqa: F401
from .compiler.tokens import token_grid  # noqa: F401
from .methods.apop import apop  # noqa: F401,E402  (srd_fx.apop(model); the module is srd_fx.methods.apop)
from .errors import (DistributedError, InputError, LayerError, MissingDependencyError,  # noqa: F401
                     NonFiniteError, OptionError, OutputCollisionError, PrecisionLossError, ResumeError,
                     SRDError, TraceError, TrainingModeError, UnsupportedOpError, UnsupportedPrecisionError)

__all__ = ["compile", "apop", "token_grid", "Explainer", "Options", "SRDOutput", "register_rule", "Rule", "Affine",
           "Activation", "SRDError", "OptionError", "TraceError", "UnsupportedOpError", "TrainingModeError",
           "InputError", "LayerError", "NonFiniteError", "PrecisionLossError", "UnsupportedPrecisionError",
           "DistributedError", "ResumeError", "OutputCollisionError", "MissingDependencyError", "__version__"]
