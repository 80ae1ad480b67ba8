"""Exceptions that reach the user.

`OnnxlrError` is a user mistake (missing file, malformed option, bad sample data): the CLI prints its
message on one line and exits with code 2, never a traceback.
"""


class OnnxlrError(Exception):
    """A problem with the user's input, described in one line."""
