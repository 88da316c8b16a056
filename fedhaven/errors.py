"""The one error type for mistakes a user can fix."""


class FedhavenError(Exception):
    """A user-facing error: the message names the problem and the fix, in one line.

    The CLI prints it without a traceback and exits non-zero.
    """
