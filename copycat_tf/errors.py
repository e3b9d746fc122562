"""Errors a user can act on.

Each message names the input, what was expected and what to do; entry modules print
them as one line and exit non-zero instead of a traceback.
"""


class UserInputError(ValueError):
    """A flag, file or dataset given by the user is not what copycat_tf expects."""


class Terminated(Exception):
    """The process got SIGTERM while a long step ran; raised so that `finally` blocks stop
    child servers and close files. Work done so far is kept; re-running resumes."""
