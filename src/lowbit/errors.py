"""The one exception type the CLI turns into a one-line message."""


class LowbitError(Exception):
    """A user-facing error: bad input, missing files, unsupported models or schemes."""
