"""The errors bilm reports to its user; importing this module is cheap.

Every error that means "what you gave bilm cannot be used" (a file, a line, a config key, a flag,
a checkpoint, a missing extra) derives from ``BilmError`` and names what is wrong in its message.
The command line prints a ``BilmError`` (and an ``OSError``: a missing file, a full disk) as one
line and exits 1; any other exception is a bug in bilm and keeps its traceback.

The classes of each stage live with it (``ConfigError`` in ``bilm.runs.config``, ``CheckpointError``
in ``bilm.runs.checkpoint``, ...); most also derive from ``ValueError`` (through ``InputError``) so
that code written against older bilm, which caught ``ValueError``, keeps working.
"""


class BilmError(Exception):
    """The root of the errors bilm reports to its user (one line on the command line)."""


class InputError(BilmError, ValueError):
    """A file, flag, argument or value that bilm cannot use; the message names it."""


class CheckpointWriteError(BilmError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous ones are intact."""


class MissingExtra(BilmError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RunDirectoryLocked(BilmError, RuntimeError):
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


def read_json(path: str, error: type[Exception] = InputError):
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
    except RecursionError:  # a hand-made file nested deeper than the parser recurses
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
