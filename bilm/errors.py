"""Errors the command line reports as one line (no traceback); importing this module is cheap."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous ones are intact."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RunDirectoryLocked(RuntimeError):
    """Another process is training into the same run directory."""


def not_utf8(path) -> str:
    """``PATH, line N: not UTF-8 text (...)`` for a file that failed to decode. The bad bytes are
    found again line by line: a text-mode reader's error only knows its offset within the chunk it
    was decoding (a newline byte is never part of a multi-byte character, so lines decode alone)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}, line {number}: not UTF-8 text (byte {e.start + 1} of the line: {e.reason})"
    return f"{path}: not UTF-8 text"


def read_json(path: str, error: type[Exception] = ValueError):
    """The JSON value in ``path``; a file that is not UTF-8 JSON raises ``error`` naming the file and
    where it goes wrong (``OSError`` from opening passes through: the CLI reports it as one line)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise error(not_utf8(path)) from None
