"""The project's error types: every expected failure is one of these, shown to users as one line."""


class LoraclError(Exception):
    """Base class of all errors loracl reports to a user without a traceback."""


class ConfigError(LoraclError):
    """A configuration file or override is invalid."""


class DataError(LoraclError):
    """Benchmark data is missing or malformed."""


class ModelError(LoraclError):
    """A model or tokenizer cannot be loaded."""
