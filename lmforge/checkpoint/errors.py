"""The one error type for unreadable or inconsistent checkpoint files."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be; the message names the file (and tensor)."""
