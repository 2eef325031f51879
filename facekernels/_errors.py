"""The errors facekernels raises besides ValueError / TypeError, in the lowest layer so every module can raise
them without importing the layer that picks a backend."""


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run in this installation or on these tensors."""


class ExtensionUnavailableError(RuntimeError):
    """facekernels._C is missing or does not load with this torch."""
