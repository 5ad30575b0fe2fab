"""One exception type per kind of user mistake.

The CLI turns any :class:`SlimformerError` into a one-line message on stderr and a
non-zero exit; anything else is a bug and keeps its traceback.
"""


class SlimformerError(Exception):
    """Base class: a problem with what the user asked for, not a bug."""

    exit_code = 2


class ModelLoadError(SlimformerError):
    """The model path, hub id or file is missing, corrupt or unreadable."""


class UnsupportedArchitectureError(SlimformerError):
    """No adapter knows this model family."""


class UnsafeCheckpointError(SlimformerError):
    """A pickle-only checkpoint was offered without --trust-pickle."""


class DataError(SlimformerError):
    """Evaluation or calibration data is missing, empty or too short."""


class RecipeError(SlimformerError):
    """A recipe is malformed, names an unknown technique or a bad argument."""


class QuantConfigError(SlimformerError):
    """A quantisation setting cannot apply (bits out of range, group size, ...)."""


class OutputExistsError(SlimformerError):
    """The output directory exists and --overwrite was not given."""


class MemoryBudgetError(SlimformerError):
    """A memory budget is malformed, or too small for what must stay resident."""


class ParallelConfigError(SlimformerError):
    """A tensor-parallel setting cannot apply (world size does not divide the heads, ...)."""


class SparsityConfigError(SlimformerError):
    """A sparsity setting cannot apply (N >= M, M not dividing a layer's input, sparsity outside [0, 1))."""


class TrainingError(SlimformerError):
    """Training cannot start or resume (data too short for one batch, a checkpoint of another model or recipe)."""


class ExportError(SlimformerError):
    """A model cannot be written in the format asked for."""
