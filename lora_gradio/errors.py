"""One exception type for mistakes a user can fix, so the CLI and the UI show its message instead of a traceback."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""
