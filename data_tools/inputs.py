"""Finding, opening and reading the raw input files.

Files are read as bytes in blocks of whole lines (cut after the last newline) so
that the main process does no per-line work; decoding happens in the workers, where
invalid UTF-8 is replaced and counted (``decode_counting``).
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import os
from typing import BinaryIO, Iterator

from bilm.core.errors import InputError

_DECOMPRESSORS = {".gz": lambda raw: gzip.GzipFile(fileobj=raw), ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
# Rough uncompressed/compressed size ratios, only used to size the shuffle buckets.
_EXPANSION = {".gz": 3.5, ".bz2": 5.0, ".xz": 6.0}


def estimated_text_bytes(path: str) -> int:
    return int(os.path.getsize(path) * _EXPANSION.get(_suffix(path), 1.0))


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def open_binary(path: str, raw: BinaryIO) -> BinaryIO:
    decompressor = _DECOMPRESSORS.get(_suffix(path))
    return decompressor(raw) if decompressor is not None else raw


def read_blocks(path: str, block_bytes: int = 8 << 20) -> Iterator[tuple[bytes, int]]:
    """Yield ``(block, compressed_bytes_read_since_last_block)``; every block ends at a line end.

    The last line of a file may lack its newline; it is still yielded.
    """
    with open(path, "rb") as raw:
        stream = open_binary(path, raw)
        try:
            carry = b""
            position = 0
            while True:
                data = stream.read(block_bytes)
                progress = raw.tell() - position
                position += progress
                if not data:
                    if carry:
                        yield carry, progress
                    return
                data = carry + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no line end in the block yet: a very long line, keep reading
                    carry = data
                    continue
                carry = data[cut:]
                yield data[:cut], progress
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise InputError(f"{path}: cannot decompress ({e})") from None
        finally:
            if stream is not raw:
                stream.close()


class _InvalidBytes:
    """Error handler state: replaces invalid UTF-8 with U+FFFD and counts replacements."""
    count = 0
    first_offset = -1


def _replace_and_count(error: UnicodeDecodeError) -> tuple[str, int]:
    if _InvalidBytes.count == 0:
        _InvalidBytes.first_offset = error.start
    _InvalidBytes.count += 1
    return "\ufffd", error.end


codecs.register_error("bilm-replace-and-count", _replace_and_count)


def decode_counting(data: bytes) -> tuple[str, int, int]:
    """UTF-8 text of ``data``, the number of invalid sequences replaced, and the byte
    offset of the first one (-1 if none)."""
    try:
        return data.decode("utf-8"), 0, -1
    except UnicodeDecodeError:
        _InvalidBytes.count, _InvalidBytes.first_offset = 0, -1
        text = data.decode("utf-8", errors="bilm-replace-and-count")
        return text, _InvalidBytes.count, _InvalidBytes.first_offset
