"""The exceptions lipdp raises on purpose, under one root.

Catch :class:`LipdpError` to handle every refusal of the library (the CLI does,
and exits with code 2 and the message). Each class also derives from the
built-in exception a caller would expect (``ValueError``, ``RuntimeError``),
so code written against those keeps working.
"""


class LipdpError(Exception):
    """Root of every error lipdp raises deliberately."""


class ModelNotSupportedError(LipdpError, ValueError):
    """The model cannot be given a certified per-sample gradient bound (or clipped safely)."""
