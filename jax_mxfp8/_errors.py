"""Exception types shared by modules that cannot import each other."""


class CheckpointError(ValueError):
    """A safetensors file or directory that cannot be read as asked (the message says why)."""
