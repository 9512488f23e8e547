"""Exceptions raised by srd_fx.  Every message says what was wrong and what to do."""


class SRDError(Exception):
    """Base class of srd_fx errors."""


class TraceError(SRDError):
    """The model cannot be traced by torch.fx."""


class UnsupportedOpError(SRDError):
    """A node of the model has no rule (or a rule that refuses this use of the op)."""


class TrainingModeError(SRDError):
    """The model (or one of its modules) is in training mode."""


class InputError(SRDError, ValueError):
    """The input or the target is not acceptable (rank, channels, range, finiteness)."""


class NonFiniteError(SRDError, FloatingPointError):
    """A NaN or Inf appeared (in the input, the weights or a computed map)."""


class PrecisionLossError(NonFiniteError):
    """In float16/bfloat16, rounding or underflow lost the map (it no longer conserves the seed's
    relevance) without producing a NaN."""


class UnsupportedPrecisionError(SRDError, RuntimeError):
    """This machine has no kernel for a float16/bfloat16 computation of the model or its twin (a CPU
    without oneDNN float16 support, an op PyTorch does not implement in half precision on CPU)."""
