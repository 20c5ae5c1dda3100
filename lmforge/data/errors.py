"""The one error type for bad input data."""


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` so the user can find and fix it."""
