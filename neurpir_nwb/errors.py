"""Exceptions raised by neurpir-nwb.

Every message names the file, the neuron (unit or ROI id) where one applies, the
offending value and what to do next. The command-line program prints the message
of any :class:`NeurpirError` as one line and exits with status 2.
"""


class NeurpirError(Exception):
    """Base class of the errors that the command-line program reports in one line."""


class RecipeError(NeurpirError):
    """Invalid recipe: an unknown key, a wrong type or a value out of range."""


class SourceError(NeurpirError):
    """Source file that is missing, truncated, or not a readable NWB 2.x file."""


class DataError(NeurpirError):
    """Data inside a readable file that violates the recipe's policy, such as descending spike times."""


class RunDirectoryError(NeurpirError):
    """Run directory that already contains the results of an earlier run."""


class ModelError(NeurpirError):
    """Model directory or checkpoint that is missing, incomplete or written by an incompatible version."""


class TrainingError(NeurpirError):
    """Training that cannot start or cannot go on, such as a missing CUDA device or a loss that became NaN."""


class EvaluationInputError(DataError, ValueError):
    """Invalid input to an evaluation function, such as too few labelled neurons per class."""
