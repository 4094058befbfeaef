"""Finding, recognizing, opening and reading the raw input files.

A file's format comes from its name (``.txt``, ``.jsonl`` / ``.json`` / ``.ndjson``, ``.csv``,
``.tsv``, ``.parquet``, ``.arrow``; text, JSON lines, CSV and TSV possibly ``.gz`` / ``.bz2`` /
``.xz`` / ``.zst``) and is checked against its first bytes (compression magic numbers, Parquet's
``PAR1``), so a misnamed file is refused in one line instead of read as garbage. A directory that
Hugging Face ``datasets``' ``save_to_disk`` wrote is read through its Arrow files
(``data_tools.tables``).

Text and JSON lines files are read as bytes in blocks of whole lines (cut after the last newline)
so that the main process does no per-line work; decoding (and JSON parsing) happens in the
workers, where invalid UTF-8 is replaced and counted (``decode_counting``). CSV and TSV files are
tables (a header row names the columns) that pyarrow's CSV reader parses (``data_tools.tables``),
decompressed by ``open_binary`` as the text formats are (``ReadableStream``).
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import io
import lzma
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from bilm.core.errors import InputError, MissingExtra, read_json
from bilm.data.inputs import resolve_inputs

MISSING_CORPORA_EXTRA = "{what} needs the corpora extra: pip install 'bilm[corpora]' (or pip install {package})"
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_MAGIC = {".gz": b"\x1f\x8b", ".bz2": b"BZh", ".xz": b"\xfd7zXZ\x00", ".zst": b"\x28\xb5\x2f\xfd"}
_NAMES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstandard"}
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
CSV_SUFFIXES = {".csv": "csv", ".tsv": "tsv"}  # suffix -> format; tables with a header row
PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
# Rough uncompressed text / file size ratios, only used to size the shuffle buckets.
_EXPANSION = {".gz": 3.5, ".bz2": 5.0, ".xz": 6.0, ".zst": 4.0, "parquet": 2.5, "arrow": 1.0}
# Hugging Face save_to_disk: a Dataset's directory, and a DatasetDict's (one subdirectory per split).
HF_DATASET_FILES = ("state.json", "dataset_info.json")
HF_DICT_FILE = "dataset_dict.json"


class TruncatedInput(InputError):
    """A compressed stream that ends before its end marker (a cut download, a full disk), or that
    cannot be decompressed past some point (damaged bytes); ``reason``: "truncated" or "damaged",
    ``lines``: the complete lines read before."""
    reason = "truncated"
    lines = 0


@dataclass(frozen=True)
class InputFile:
    """One input: its path, format ("text", "jsonl", "csv", "tsv", "parquet" or "arrow") and compression
    (a suffix of ``COMPRESSIONS``, or "")."""
    path: str
    format: str
    compression: str = ""

    @property
    def kind(self) -> str:
        return self.format + (f"+{self.compression[1:]}" if self.compression else "")


def _suffixes(path: str) -> tuple[str, str]:
    """(format suffix, compression suffix) of a file name, both lower case ('' when none)."""
    base, last = os.path.splitext(os.path.basename(path).lower())
    if last in COMPRESSIONS:
        return os.path.splitext(base)[1], last
    return last, ""


def format_from_name(path: str) -> InputFile:
    suffix, compression = _suffixes(path)
    if suffix in PARQUET_SUFFIXES or suffix in ARROW_SUFFIXES:
        if compression:
            raise InputError(f"{path}: a {suffix} file is compressed inside; decompress the {compression} around it")
        return InputFile(path, "parquet" if suffix in PARQUET_SUFFIXES else "arrow")
    if suffix in CSV_SUFFIXES:
        return InputFile(path, CSV_SUFFIXES[suffix], compression)
    return InputFile(path, "jsonl" if suffix in JSON_SUFFIXES else "text", compression)


def detect_format(path: str) -> InputFile:
    """The format the name says, checked against the first bytes; a mismatch is one line naming both."""
    found = format_from_name(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return found  # an empty file is empty in every format
    seen = next((suffix for suffix, magic in _MAGIC.items() if head.startswith(magic)), "")
    if found.format == "parquet":
        if not head.startswith(PARQUET_MAGIC):
            raise InputError(f"{path}: not a Parquet file (it does not start with {PARQUET_MAGIC!r})"
                             + (f"; it is {_NAMES[seen]} data" if seen else ""))
        return found
    if found.format == "arrow":
        if not (head.startswith(ARROW_FILE_MAGIC) or head.startswith(b"\xff\xff\xff\xff")):
            raise InputError(f"{path}: not an Arrow IPC file or stream")
        return found
    if found.compression and seen != found.compression:
        raise InputError(f"{path}: cannot decompress (the name says {_NAMES[found.compression]}, the content is "
                         f"{_NAMES[seen] + ' data' if seen else 'not compressed'})")
    if not found.compression:
        if seen:
            raise InputError(f"{path}: {_NAMES[seen]}-compressed data in a file not named so; rename it "
                             f"to end in {seen}")
        if head.startswith(PARQUET_MAGIC):
            raise InputError(f"{path}: a Parquet file; rename it to end in .parquet")
    if found.format == "jsonl":
        _refuse_json_document(found)
    return found


def _refuse_json_document(item: InputFile) -> None:
    """A ``.json`` file that holds one JSON document (an array of records, or an object printed over
    several lines) rather than JSON lines: one error saying how to convert it, instead of a "not
    JSON" bad record at line 1. Neither can be JSON lines: a line "[..." or "{" alone is no object."""
    try:
        with open(item.path, "rb") as raw:
            head = open_binary(item, raw).read1(1 << 16)
    except DECOMPRESSION_ERRORS:
        return  # a damaged stream is reported where it is read, with the lines before it
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    first_line = start.split(b"\n", 1)[0].strip()
    if start.startswith(b"["):
        what, pick, key = "an array", "'.[]'", ""
    elif first_line == b"{":
        what, pick, key = "an object printed over several lines", "'.KEY[]'", ", KEY the key that holds the records"
    else:
        return
    stem = os.path.basename(item.path).split(".")[0]
    decompress = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}.get(item.compression)
    command = f"{decompress} -dc {item.path} | jq -c {pick}" if decompress else f"jq -c {pick} {item.path}"
    raise InputError(f"{item.path}: one JSON document ({what}), not JSON lines (one object a line); convert it, "
                     f"e.g. {command} > {stem}.jsonl{key}")


def _plain_name(name) -> bool:
    """A file or directory name inside the dataset's directory (no path: nothing outside it, not itself)."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name


def _hf_data_files(directory: str) -> list[str] | None:
    """The Arrow files of a ``save_to_disk`` directory (a Dataset, or every split of a DatasetDict),
    in their order; None when ``directory`` is not one."""
    dict_file = os.path.join(directory, HF_DICT_FILE)
    if os.path.isfile(dict_file):
        spec = read_json(dict_file)
        splits = spec.get("splits") if isinstance(spec, dict) else None
        if not isinstance(splits, list) or not all(_plain_name(s) for s in splits):
            raise InputError(f"{dict_file}: key 'splits' must list the splits' directories (names inside it)")
        files = []
        for split in splits:
            found = _hf_data_files(os.path.join(directory, split))
            if found is None:
                raise InputError(f"{dict_file} names the split {split!r}, which is not a saved dataset")
            files += found
        return files
    if not all(os.path.isfile(os.path.join(directory, name)) for name in HF_DATASET_FILES):
        return None
    state_file = os.path.join(directory, "state.json")
    state = read_json(state_file)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and _plain_name(e.get("filename"))
                                                for e in entries):
        raise InputError(f"{state_file}: key '_data_files' must list the dataset's Arrow files (names inside it)")
    files = [os.path.join(directory, e["filename"]) for e in entries]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{state_file} names {path}, which does not exist")
    return files


def _walk(directory: str) -> list[str]:
    """A directory's files (recursively, hidden ones skipped, sorted); a Hugging Face dataset
    inside it gives its Arrow files, not its JSON bookkeeping."""
    found = []
    for root, dirs, files in os.walk(directory):
        hf = _hf_data_files(root)
        if hf is not None:
            found += hf
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    if not found:
        raise FileNotFoundError(f"input directory {directory!r} contains no files")
    return found


def resolve_corpus(specs: list[str]) -> list[InputFile]:
    """Files from files, directories, globs and Hugging Face ``save_to_disk`` directories, each with
    its checked format."""
    paths: list[str] = []
    for spec in map(os.fspath, specs):
        paths += _walk(spec) if os.path.isdir(spec) else resolve_inputs([spec])
    return [detect_format(path) for path in resolve_inputs(paths)] if paths else []


def estimated_text_bytes(item: InputFile) -> int:
    key = item.compression or (item.format if item.format in ("parquet", "arrow") else "")
    return int(os.path.getsize(item.path) * _EXPANSION.get(key, 1.0))


def require_zstandard():
    """The zstandard module, or a one-line error naming the extra."""
    try:
        import zstandard
    except ImportError:
        raise MissingExtra(MISSING_CORPORA_EXTRA.format(what="reading .zst files", package="zstandard")) from None
    return zstandard


class _ZstdReader:
    """``read1`` over a zstandard stream of one or more frames; a stream cut inside a frame raises
    EOFError (zstandard's own stream reader ends quietly there)."""

    def __init__(self, raw: BinaryIO):
        zstandard = require_zstandard()
        self._raw, self._error = raw, zstandard.ZstdError
        self._context = zstandard.ZstdDecompressor()
        self._frame = None
        self._pending = b""

    def read1(self, size: int) -> bytes:
        while True:
            # Small reads: a damaged block then loses only itself, not the blocks read with it.
            data, self._pending = self._pending or self._raw.read(min(size, 64 << 10)), b""
            if not data:
                if self._frame is not None:
                    raise EOFError("compressed file ended before the end-of-frame marker was reached")
                return b""
            if self._frame is None:
                self._frame = self._context.decompressobj()
            try:
                out = self._frame.decompress(data)
            except self._error as e:
                raise OSError(f"zstandard: {e}") from None
            if self._frame.eof:
                self._pending, self._frame = self._frame.unused_data, None
            if out:
                return out

    def close(self) -> None:
        pass


def open_binary(item: InputFile, raw: BinaryIO):
    """A stream with ``read1`` of the file's uncompressed bytes."""
    if item.compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if item.compression == ".bz2":
        return bz2.BZ2File(raw)
    if item.compression == ".xz":
        return lzma.LZMAFile(raw)
    if item.compression == ".zst":
        return _ZstdReader(raw)
    return raw


DECOMPRESSION_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)  # zlib.error: a damaged gzip stream


def decompression_failure(item: InputFile, error: Exception) -> tuple[str, str]:
    """("truncated" or "damaged", what happened) for an error of one of ``DECOMPRESSION_ERRORS``
    met reading ``item``'s stream (EOFError: it ends early)."""
    if isinstance(error, EOFError):
        return "truncated", f"truncated: the {_NAMES[item.compression]} stream ends early ({error})"
    return "damaged", f"cannot decompress: the {_NAMES[item.compression]} stream is damaged ({error})"


class ReadableStream(io.RawIOBase):
    """An ``open_binary`` stream as a file object (``read``, ``readinto``) for readers that want one
    (pyarrow's CSV reader, the csv module); the decompression error it raised, if any, is kept in
    ``error``, so that it can be told from the reader's own errors."""

    def __init__(self, stream):
        super().__init__()
        self._stream, self.error = stream, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._stream.read1(len(buffer))
        except DECOMPRESSION_ERRORS as e:
            self.error = e
            raise
        buffer[:len(data)] = data
        return len(data)


def read_blocks(item: InputFile, block_bytes: int = 8 << 20) -> Iterator[tuple[bytes, int]]:
    """Yield ``(block, compressed_bytes_read_since_last_block)``; every block ends at a line end.

    The last line of a file may lack its newline; it is still yielded. A compressed stream cut
    short raises ``TruncatedInput`` after the blocks of its complete lines (its ``lines`` says how
    many); the cut line is dropped.
    """
    path = item.path
    lines = 0
    with open(path, "rb") as raw:
        stream = open_binary(item, raw)
        try:
            carry = b""
            position = 0
            truncated: Exception | None = None  # EOFError: cut short; else the decompressor's error: damaged
            while True:
                if stream is raw:
                    data = raw.read(block_bytes)
                else:  # read1: a cut stream loses only what follows its last complete line
                    parts, size = [], 0
                    try:
                        while size < block_bytes and (more := stream.read1(min(block_bytes - size, 1 << 20))):
                            parts.append(more)
                            size += len(more)
                    except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
                        truncated = e
                    data = b"".join(parts)
                progress = raw.tell() - position
                position += progress
                if not data and truncated is None:
                    if carry:
                        yield carry, progress
                    return
                data = carry + data
                cut = data.rfind(b"\n") + 1
                carry = data[cut:]
                if cut:
                    lines += data.count(b"\n", 0, cut)
                    yield data[:cut], progress
                if truncated is not None:
                    reason, what = decompression_failure(item, truncated)
                    error = TruncatedInput(f"{path}: {what}; after {lines:,} complete lines")
                    error.lines, error.reason = lines, reason
                    raise error
                # cut == 0: no line end in the block yet, a very long line: keep reading
        except (OSError, lzma.LZMAError, zlib.error) as e:  # zlib.error: a damaged gzip stream
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
