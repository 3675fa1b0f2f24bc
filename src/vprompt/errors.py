"""Exceptions raised by vprompt. Every message says what was wrong and what to do."""


class VPromptError(Exception):
    """Base class of every error vprompt raises on bad input."""


class ConfigError(VPromptError, ValueError):
    """A method, training or sweep option that does not fit."""


class BackboneError(VPromptError):
    """A backbone spec, checkpoint or zoo entry that cannot be loaded."""


class BackboneSpecError(BackboneError, ConfigError):
    """A backbone spec that does not parse or names no model: a bad option value, so the
    command line exits with the usage status (2) as for other bad options."""


class DataError(VPromptError):
    """A dataset spec, file or split that cannot be read."""


class DataSpecError(DataError, ConfigError):
    """A dataset spec that does not parse (unknown kind, builtin or option, a bad fraction):
    a bad option value, exit status 2 on the command line."""


class UnreadableImage(DataError):
    """An image file that is missing or cannot be decoded when it is loaded. Under torchrun
    only the process whose share of the data holds it meets this error."""


class TaskError(VPromptError):
    """A task artifact that is missing, corrupt or made for another backbone."""


class TrainingError(VPromptError):
    """Training cannot go on (for example a NaN loss)."""


class TrainingDiverged(TrainingError):
    """The loss or the trained weights became NaN/inf (the last good checkpoint is kept)."""
