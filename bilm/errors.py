"""Errors the command line reports as one line (no traceback); importing this module is cheap."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous ones are intact."""


class RunDirectoryLocked(RuntimeError):
    """Another process is training into the same run directory."""
