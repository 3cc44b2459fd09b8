"""The one error type of the checkpoint package."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the one-line message names the file and tensor."""
