"""Errors that mean "the user asked for something that cannot be done".

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class LensbenchError(Exception):
    """A user-facing error: bad input, unavailable model or device, refused overwrite."""


class ExampleError(LensbenchError):
    """An example breaks a task invariant (e.g. a candidate that is not one token)."""
