"""Errors the command line reports as one line (no traceback); importing this module is cheap."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous ones are intact."""


class RunDirectoryLocked(RuntimeError):
    """Another process is training into the same run directory."""


def read_json(path: str, error: type[Exception] = ValueError):
    """The JSON value in ``path``; a file that is not UTF-8 JSON raises ``error`` naming the file and
    where it goes wrong (``OSError`` from opening passes through: the CLI reports it as one line)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
