"""The project's error types: every expected failure is one of these, shown to users as one line."""


class LoraclError(Exception):
    """Base class of all errors loracl reports to a user without a traceback."""

    exit_code = 2  # the CLI's exit status for this error


class ConfigError(LoraclError):
    """A configuration file or override is invalid."""


class DataError(LoraclError):
    """Benchmark data is missing or malformed."""


class ModelError(LoraclError):
    """A model or tokenizer cannot be loaded."""


class CheckpointError(LoraclError):
    """A checkpoint cannot be written or read, or does not belong to the run being resumed."""


class AdapterMismatchError(LoraclError):
    """An adapter does not fit the base model (other architecture, layer shapes or rank)."""


class RunFolderError(LoraclError):
    """A run or adapter folder is damaged: a file of it is missing, unreadable, truncated or inconsistent with
    the others (the message names the file)."""


class RunInterrupted(LoraclError):
    """SIGINT or SIGTERM stopped a run between two training or evaluation steps; the checkpoint is kept."""

    exit_code = 130  # the shell's convention for a run stopped by a signal


# `loracl run`'s exit status when the run finished but its last adapter version was held back by the
# forgetting guard (versions.max_forgetting): adapter/ serves an earlier version (loracl.outputs.versions).
HELD_BACK_EXIT = 3
