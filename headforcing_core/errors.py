"""Errors the core raises for bad input. Each message says what to change."""


class HeadForcingError(ValueError):
    """Base class: bad input detected before (or instead of) sampling."""


class ModelFamilyError(HeadForcingError):
    """The model is not a Wan2.1-shaped text-to-video transformer."""


class ShapeError(HeadForcingError):
    """Sizes that cannot work: width/height, lengths, text width, batch."""


class PolicyError(HeadForcingError):
    """A cache policy or labels matrix that does not make sense or does not fit the model."""


class ProfileError(HeadForcingError):
    """A head profile that is corrupt or belongs to another model shape."""


class CheckpointError(HeadForcingError):
    """A checkpoint file that is unreadable, unsafe or not in a supported layout."""


class MemoryBudgetError(HeadForcingError):
    """The pre-flight estimate says the run cannot fit in the device's memory."""


class StateError(HeadForcingError):
    """An AR_STATE that does not fit the model, size or policy it is used with."""


class Interrupted(RuntimeError):
    """Raised when the caller's cancellation hook asks to stop."""
