"""Exceptions raised by srd_fx.  Every message says what was wrong and what to do."""


class SRDError(Exception):
    """Base class of srd_fx errors."""


class TraceError(SRDError):
    """The model cannot be traced by torch.fx."""


class UnsupportedOpError(SRDError):
    """A node of the model has no rule (or a rule that refuses this use of the op)."""


class TrainingModeError(SRDError):
    """The model (or one of its modules) is in training mode."""


class LayerError(SRDError, KeyError):
    """A layer name (``layers=``, ``encoder_output=``, ``--layer``) that names no usable layer."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(SRDError, ValueError):
    """The input or the target is not acceptable (rank, channels, range, finiteness)."""


class UnknownMethodError(InputError, KeyError):
    """A method name (``--methods``, ``--baselines``, ``get_method``) that no registered
    attribution method has; the message lists the available ones."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteError(SRDError, FloatingPointError):
    """A NaN or Inf appeared (in the input, the weights or a computed map)."""


class DistributedError(SRDError):
    """A data-parallel run (under torchrun) cannot start or go on: an unreachable rendezvous, a
    launch environment that does not add up, or a rank that failed (the message names it)."""


class ResumeError(SRDError):
    """An output folder holds an unfinished earlier run that this one cannot resume (another number
    of processes, other settings); nothing was overwritten."""


class OutputCollisionError(SRDError):
    """Two inputs (so possibly two ranks) would write the same output file; nothing was written."""


class PrecisionLossError(NonFiniteError):
    """In float16/bfloat16, rounding or underflow lost the map (it no longer conserves the seed's
    relevance) without producing a NaN."""


class UnsupportedPrecisionError(SRDError, RuntimeError):
    """This machine has no kernel for a float16/bfloat16 computation of the model or its twin (a CPU
    without oneDNN float16 support, an op PyTorch does not implement in half precision on CPU)."""


class OptionError(SRDError, ValueError, TypeError):
    """A compile option has an unknown name or a value that is not accepted."""


class MissingDependencyError(SRDError, ImportError):
    """An optional library is not installed; the message names it and the extra that installs it
    (``pip install "srd_fx[eval]"``)."""
