"""Errors a user can act on. Each message says what went wrong and what to do instead."""


class PruneError(Exception):
    """Base class: a problem with the user's input, shown to them as is (no traceback)."""


class ModelLoadError(PruneError):
    pass


class DataError(PruneError):
    pass


class PatternError(PruneError):
    """A sparsity or N:M pattern that cannot be applied. `bad_layers` lists the layers at fault."""

    def __init__(self, message: str, bad_layers: list[str] | None = None):
        super().__init__(message)
        self.bad_layers = bad_layers or []


class MaskFileError(PruneError):
    pass


class Cancelled(PruneError):
    """A long job was cancelled by the user; the model is left as it was before the job."""


class SourceChanged(PruneError):
    """A file read after it was opened (a checkpoint the dense weights come from, a memory-mapped
    artifact or session) changed or vanished on disk: what it held can no longer be trusted."""
