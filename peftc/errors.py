"""Every error peftc raises derives from PeftcError and says what was wrong, where, and how to fix it."""


class PeftcError(Exception):
    """Base class of every peftc error."""


class SpecError(PeftcError, ValueError):
    """The spec is invalid or matches nothing in the model."""


class CaptureError(PeftcError):
    """torch.export could not capture the model."""


class GenerationError(PeftcError):
    """generate() was asked for something the compiled model cannot generate with."""


class PassError(PeftcError):
    """A compiler pass failed or left an invalid graph."""


class AdapterError(PeftcError, KeyError):
    """An adapter state dict does not fit the compiled model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ExportError(PeftcError):
    """Lowering to ONNX failed or the exported model disagrees with eager PyTorch."""


class BudgetError(PeftcError):
    """No recomputation schedule fits a training step into the memory budget; `smallest` is the least that fits
    (bytes)."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest
