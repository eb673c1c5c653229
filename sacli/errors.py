"""Domain errors. The CLI edge turns them into one stderr line and an exit code."""


class SacliError(Exception):
    """A failure the user can act on; its message is shown as one line."""

    exit_code = 1


class UsageError(SacliError):
    """Bad input from the user: paths, options, config keys."""

    exit_code = 2


class InputError(SacliError):
    """The documents given cannot be read or used (missing, empty, binary...)."""

    exit_code = 2


class ContextLimitError(SacliError):
    """The prompt does not fit the model's context."""

    exit_code = 3


class ModelError(SacliError):
    """The model cannot be found, pulled, converted or loaded."""

    exit_code = 4
