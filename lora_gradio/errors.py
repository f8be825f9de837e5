"""One exception type for mistakes a user can fix, so the CLI and the UI show its message instead of a traceback."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class Stopped(UserError):
    """A Stop reached work with nothing to hand back yet (waiting for the model, encoding, mid-image); the job
    that runs it catches it and returns its own stopped result, so no job ends in an error for a Stop."""
