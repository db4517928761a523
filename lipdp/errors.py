"""The exceptions lipdp raises on purpose, under one root.

Catch :class:`LipdpError` to handle every refusal of the library (the CLI does,
and exits with code 2 and the message). Each class also derives from the
built-in exception a caller would expect (``ValueError``, ``RuntimeError``,
``FileExistsError``), so code written against those keeps working. The
modules that raise them re-export them (``lipdp.config.ConfigError`` is
``lipdp.errors.ConfigError``).
"""


class LipdpError(Exception):
    """Root of every error lipdp raises deliberately."""


class ModelNotSupportedError(LipdpError, ValueError):
    """The model cannot be given a certified per-sample gradient bound (or clipped safely)."""


class NotPrivateError(LipdpError, RuntimeError):
    """A DP model was asked to train or account in a way its guarantee does not cover."""


class PrivacyBudgetExhausted(LipdpError, RuntimeError):
    """No noisy step fits in what is left of the budget."""


class PrivacyParameterError(LipdpError, ValueError):
    """A privacy parameter is invalid, or the requested guarantee is impossible."""


class ConfigError(LipdpError, ValueError):
    """A config key is unknown, missing or of the wrong type."""


class RunExistsError(LipdpError, FileExistsError):
    """The output folder already holds a completed run."""


class IncompleteRunError(LipdpError, FileNotFoundError):
    """The folder holds no completed run (no ``privacy.json``)."""


class DataUnavailableError(LipdpError, RuntimeError):
    """The data could not be obtained: the download failed or local files are missing."""


class DataFormatError(LipdpError, ValueError):
    """A local data file exists but is corrupt or not in the expected format."""
