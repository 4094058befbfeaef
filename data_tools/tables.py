"""Parquet files, Arrow IPC files (what Hugging Face ``save_to_disk`` writes) and CSV / TSV files
-> blocks of text.

Read in bounded memory: Parquet one row group at a time, in record batches of at most
``BATCH_ROWS`` rows, and only the text column; Arrow files memory-mapped, a record batch at a
time; CSV and TSV by pyarrow's streaming CSV reader, ``CSV_READ_BYTES`` of the (decompressed) file
at a time, only the text column converted. The text values of a batch are joined with newlines by
Arrow itself (no per-row Python), so a block of a table is read by the workers exactly as a block
of a text file: a value holding newlines is several lines, as it would be in a text file.

A bad value (null, or a row without the field) is a bad record; a row group or a file that cannot
be read, or a column that is missing or does not hold strings, makes all its rows bad. With
``skip_bad`` they are counted (``BadRecords``), else the first one stops the run, named by file,
row group and row (both counted from 0).

CSV and TSV (``read_csv``): a header row names the columns, ``--text-field`` one of them (a name,
not a path: CSV columns are flat). Its values are read as bytes whatever they look like (a column
of numbers is text), and decoded in the workers as a text file is: invalid UTF-8 is replaced and
counted, not an error. A row with more or fewer fields than the header is a bad record, named by
file and line; a value may hold quoted delimiters and newlines. A compressed file cut short or
damaged is one bad record (the rows before it are kept), as for the text formats.
"""
from __future__ import annotations

import contextlib
import io
import lzma
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from bilm.core.errors import InputError, MissingExtra
from data_tools.inputs import (MISSING_CORPORA_EXTRA, InputFile, ReadableStream, decompression_failure,
                               open_binary)

BATCH_ROWS = 8192  # rows per record batch read from a Parquet row group
BLOCK_BYTES = 2 << 20  # text handed to a worker at a time: small, so that the workers start while the file is read
# CSV bytes parsed at a time, and the longest row pyarrow can parse (a longer one ends the file's reading).
# pyarrow reads some blocks ahead (about 30: 120 MB), so this is also what bounds the reader's memory.
CSV_READ_BYTES = 4 << 20
CSV_DELIMITERS = {"csv": ",", "tsv": "\t"}


class BadRecord(InputError):
    """A bad record and ``skip_bad`` off: the run stops here."""


@dataclass
class BadRecords:
    """Bad records of one file: count by reason, and where the first one is."""
    counts: dict[str, int] = field(default_factory=dict)
    first: str | None = None

    def add(self, reason: str, count: int, where: str) -> None:
        if count:
            self.counts[reason] = self.counts.get(reason, 0) + count
            self.first = self.first or where


@dataclass
class TableBlock:
    data: bytes  # the text values, each ending in a newline
    rows: int  # rows read, bad ones included
    progress: int  # bytes of the file done since the previous block (for the progress bar)


def require_pyarrow():
    """pyarrow (with its compute, parquet and csv modules), or a one-line error naming the extra."""
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.csv  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingExtra(MISSING_CORPORA_EXTRA.format(what="reading Parquet, Arrow and CSV files",
                                                        package="pyarrow")) from None
    return pyarrow


def _is_text(arrow_type) -> bool:
    pa = require_pyarrow()
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or getattr(pa.types, "is_string_view", lambda t: False)(arrow_type))


class _TableReader:
    """Shared by both formats: column lookup, bad values, joining batches into blocks."""

    def __init__(self, item: InputFile, text_field: str, skip_bad: bool, bad: BadRecords):
        self.pa = require_pyarrow()
        self.item, self.path = item, item.path
        self.parts = text_field.split(".")
        self.text_field, self.skip_bad, self.bad = text_field, skip_bad, bad
        self.size = os.path.getsize(item.path)

    def report(self, reason: str, count: int, where: str) -> None:
        if not self.skip_bad:
            raise BadRecord(f"{where}; pass --skip-bad to skip such records (they are counted in the manifest)")
        self.bad.add(reason, count, where)

    def column_error(self, schema) -> str | None:
        """Why the text field cannot be read from tables of this schema, or None."""
        arrow_type, names = None, schema.names
        for depth, name in enumerate(self.parts):
            if name not in names:
                where = "" if depth == 0 else f" in {'.'.join(self.parts[:depth])!r}"
                return f"no column {name!r}{where} (columns: {', '.join(names[:12])})"
            arrow_type = (schema.field(name) if depth == 0 else arrow_type.field(name)).type
            if depth + 1 < len(self.parts):
                if not self.pa.types.is_struct(arrow_type):
                    return f"column {'.'.join(self.parts[:depth + 1])!r} holds {arrow_type}, not a struct"
                names = [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
        if not _is_text(arrow_type):
            return f"column {self.text_field!r} holds {arrow_type}, not strings (--text-field names the text column)"
        return None

    def text_of(self, column, where: Callable[[int], str]):
        """The column's non-null values as large strings; nulls are bad records (``where(i)``: row i's place)."""
        pc = self.pa.compute
        # Full validation (offsets within bounds, valid UTF-8): a damaged file's arrays would otherwise
        # be read out of bounds by the kernels below (a crash, not an error). ArrowInvalid: the caller's.
        column.validate(full=True)
        for name in self.parts[1:]:
            column = pc.struct_field(column, name)
        if column.null_count:
            first = pc.index(column.is_null(), True).as_py()
            self.report("null", column.null_count, f"{where(first)}: {self.text_field!r} is null (or missing)")
            column = column.drop_null()
        return column.cast(self.pa.large_string())

    def join(self, columns: list) -> bytes:
        """Values joined by newlines, ending in one (Arrow's kernels, not a Python loop)."""
        pa, pc = self.pa, self.pa.compute
        values = pa.concat_arrays(columns) if len(columns) > 1 else columns[0]
        if len(values) == 0:
            return b""
        lists = pa.LargeListArray.from_arrays(pa.array([0, len(values)], pa.int64()), values)
        # Strings (Parquet, Arrow) or bytes (CSV: decoded in the workers, as text files are)
        joined = pc.binary_join(lists, pa.scalar("\n" if _is_text(values.type) else b"\n", values.type))[0]
        return joined.as_buffer().to_pybytes() + b"\n"

    def blocks(self, batches: Iterator[tuple[object, int]], block_bytes: int) -> Iterator[TableBlock]:
        """Group ``(text values, rows)`` into blocks of about ``block_bytes``."""
        pending, pending_rows, pending_bytes = [], 0, 0
        for values, rows in batches:
            pending.append(values)
            pending_rows += rows
            pending_bytes += values.nbytes
            if pending_bytes >= block_bytes:
                yield self._block(pending, pending_rows)
                pending, pending_rows, pending_bytes = [], 0, 0
        if pending_rows:
            yield self._block(pending, pending_rows)

    def _block(self, columns: list, rows: int) -> TableBlock:
        data = self.join([c for c in columns if len(c)]) if any(len(c) for c in columns) else b""
        return TableBlock(data, rows, 0)


def read_parquet(item: InputFile, text_field: str, skip_bad: bool, bad: BadRecords,
                 batch_rows: int = BATCH_ROWS, block_bytes: int = BLOCK_BYTES) -> Iterator[TableBlock]:
    """The text of a Parquet file, a row group at a time, batches of ``batch_rows`` rows."""
    reader = _TableReader(item, text_field, skip_bad, bad)
    pa, path = reader.pa, item.path
    try:
        parquet = pa.parquet.ParquetFile(path)
        n_rows, n_groups = parquet.metadata.num_rows, parquet.num_row_groups
        schema = parquet.schema_arrow
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, even UnicodeDecodeError for damaged metadata
        reader.report("unreadable_file", 1, f"{path}: not a readable Parquet file ({_reason(e)})")
        return
    problem = reader.column_error(schema)
    if problem is not None:
        reader.report("no_text_column", n_rows, f"{path}: {problem}")
        return
    reported = 0

    def batches() -> Iterator[tuple[object, int]]:
        for group in range(n_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            read = 0
            try:
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group],
                                                  columns=[reader.parts[0]], use_threads=False):
                    values = reader.text_of(batch.column(0),
                                            lambda i, g=group, r=read: f"{path}: row group {g}, row {r + i}")
                    read += batch.num_rows
                    yield values, batch.num_rows
            except BadRecord:
                raise
            except Exception as e:  # as above: whatever a damaged row group makes pyarrow raise
                reader.report("unreadable_row_group", group_rows - read,
                              f"{path}: row group {group} cannot be read ({_reason(e)})")
                yield pa.array([], pa.large_string()), group_rows - read

    rows_done = 0
    for block in reader.blocks(batches(), block_bytes):
        rows_done += block.rows
        position = reader.size if rows_done >= n_rows else reader.size * rows_done // max(n_rows, 1)
        block.progress, reported = position - reported, position
        yield block


def read_arrow(item: InputFile, text_field: str, skip_bad: bool, bad: BadRecords,
               block_bytes: int = BLOCK_BYTES) -> Iterator[TableBlock]:
    """The text of an Arrow IPC stream or file (Hugging Face ``datasets`` writes streams),
    memory-mapped, a record batch at a time."""
    reader = _TableReader(item, text_field, skip_bad, bad)
    pa, path = reader.pa, item.path
    try:
        source = pa.memory_map(path)
        with open(path, "rb") as f:
            is_file = f.read(6) == b"ARROW1"
        ipc = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
        schema = ipc.schema
    except Exception as e:  # see read_parquet
        reader.report("unreadable_file", 1, f"{path}: not a readable Arrow file ({_reason(e)})")
        return
    problem = reader.column_error(schema)
    if problem is not None:
        # The row count needs every batch read; the file is bad as a whole.
        reader.report("no_text_column", 1, f"{path}: {problem}")
        return
    index = schema.get_field_index(reader.parts[0])
    reported, read, over = 0, 0, False  # bytes reported; batches read; whether the reading is over

    def batches() -> Iterator[tuple[object, int]]:
        nonlocal read, over
        number = 0
        while True:
            try:
                if is_file:
                    if number >= ipc.num_record_batches:
                        over = True
                        return
                    batch = ipc.get_batch(number)
                else:
                    batch = ipc.read_next_batch()
            except StopIteration:
                over = True
                return
            except Exception as e:  # see read_parquet
                reader.report("unreadable_batch", 1, f"{path}: record batch {number} cannot be read ({_reason(e)}); "
                                                     "the rest of the file is skipped")
                over = True
                return
            try:
                values = reader.text_of(batch.column(index), lambda i, n=number: f"{path}: record batch {n}, row {i}")
            except BadRecord:
                raise
            except Exception as e:  # see read_parquet
                reader.report("unreadable_batch", batch.num_rows, f"{path}: record batch {number} cannot be read "
                                                                  f"({_reason(e)})")
                values = pa.array([], pa.large_string())
            read = number + 1
            yield values, batch.num_rows
            number += 1

    try:
        for block in reader.blocks(batches(), block_bytes):
            # A stream is read front to back; a file's batches are read at their offsets (tell() stays put).
            position = (reader.size if over else reader.size * read // max(ipc.num_record_batches, 1) if is_file
                        else min(reader.size, source.tell()))
            block.progress, reported = position - reported, position
            yield block
    finally:
        source.close()


class _CsvSource:
    """A CSV file for pyarrow's reader: opened natively when not compressed, else through
    ``open_binary`` (the text formats' decompression). ``position()``: bytes of the file read;
    ``error``: the decompression error met, if any."""

    def __init__(self, item: InputFile, pa):
        self.raw = self.readable = None
        if item.compression:
            self.raw = open(item.path, "rb")
            self.readable = ReadableStream(open_binary(item, self.raw))
            self.stream = _Filled(self.readable)
        else:
            self.stream = pa.OSFile(item.path)

    @property
    def error(self) -> Exception | None:
        return self.readable.error if self.readable is not None else None

    def position(self) -> int:
        return (self.raw if self.raw is not None else self.stream).tell()

    def close(self) -> None:
        self.stream.close()
        if self.raw is not None:
            self.raw.close()


class _Filled:
    """``read(n)``: n bytes unless the stream ends; a decompression error after some bytes is raised
    by the next call, so that the complete rows before it are parsed (a cut row is not: the reader
    never sees the end of the stream)."""

    def __init__(self, readable: ReadableStream):
        self._readable, self._pending = readable, None
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        if self._pending is not None:
            raise self._pending
        parts, got = [], 0
        try:
            while size < 0 or got < size:
                data = self._readable.read(min(size - got, 4 << 20) if size >= 0 else 4 << 20)
                if not data:
                    break
                parts.append(data)
                got += len(data)
        except Exception as e:
            if not parts:
                raise
            self._pending = e
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._readable.close()


class _InvalidRows:
    """pyarrow's ``invalid_row_handler``: skips a row whose field count is not the header's,
    counting them and keeping the first (its row number, as pyarrow counts: the header is row 1,
    blank lines are no rows)."""

    def __init__(self):
        self.count = self.taken = 0
        self.first = None
        self.undecodable = False

    def __call__(self, row) -> str:
        self.count += 1
        if self.first is None:
            self.first = row
        return "skip"

    def take(self) -> int:
        """Rows skipped since the previous call."""
        new, self.taken = self.count - self.taken, self.count
        return new

    @contextlib.contextmanager
    def quiet(self):
        """pyarrow decodes a bad row as strict UTF-8 before calling the handler: for a row that is not
        UTF-8 it prints "Exception ignored in" with a traceback, and the reading stops with a parse
        error. While pyarrow reads, that one error is taken quietly and noted (``undecodable``)."""
        previous = sys.unraisablehook

        def hook(unraisable) -> None:
            if unraisable.object is self and isinstance(unraisable.exc_value, UnicodeDecodeError):
                self.undecodable = True
            else:
                previous(unraisable)

        sys.unraisablehook = hook
        try:
            yield
        finally:
            sys.unraisablehook = previous


def read_csv(item: InputFile, text_field: str, skip_bad: bool, bad: BadRecords, block_bytes: int = BLOCK_BYTES,
             read_bytes: int = CSV_READ_BYTES) -> Iterator[TableBlock]:
    """The ``text_field`` column of a CSV or TSV file (``item.format``; maybe compressed) with a header
    row, read as bytes ``read_bytes`` of the decompressed file at a time."""
    reader = _TableReader(item, text_field, skip_bad, bad)
    pa, path, name = reader.pa, item.path, item.format.upper()
    csv = pa.csv
    delimiter = CSV_DELIMITERS[item.format]
    invalid = _InvalidRows()
    read_options = csv.ReadOptions(use_threads=False, block_size=read_bytes)
    parse_options = csv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=invalid)
    convert_options = csv.ConvertOptions(include_columns=[text_field], column_types={text_field: pa.large_binary()})
    source = _CsvSource(item, pa)
    rows = reported = 0  # rows read (bad ones included); bytes of the file reported
    bad_row_place: list[str] = []  # where the first bad row is (found once, when there is one)

    def failed(error: Exception) -> None:
        if source.error is not None:
            reason, what = decompression_failure(item, source.error)
            reader.report(reason, 1, f"{path}: {what}; after {_rows(rows)}")
        elif rows == 0 and "Empty CSV file" in str(error):
            pass  # no header, no rows: empty (compressed, or of blank lines)
        elif isinstance(error, KeyError):
            reader.report("no_text_column", 1, f"{path}: {_missing_column(item, text_field, pa, delimiter)}")
        else:
            what = f"not a readable {name} file" if rows == 0 else f"cannot be read after {_rows(rows)}"
            why = (f"a row longer than {read_bytes / 2**20:g} MB, or a quote that is never closed"
                   if "straddles" in str(error) else
                   f"a row of the wrong field count that is not UTF-8: {_reason(error)}" if invalid.undecodable
                   else _reason(error))
            reader.report("unreadable_file" if rows == 0 else "unreadable_block", 1,
                          f"{path}: {what} ({why}); the rest of the file is skipped")

    def count_bad_rows() -> int:
        new = invalid.take()
        if new:
            if not bad_row_place:
                bad_row_place.append(_bad_row(item, delimiter, invalid.first))
            reader.report("field_count", new, bad_row_place[0])
        return new

    def batches() -> Iterator[tuple[object, int]]:
        nonlocal rows
        try:
            with invalid.quiet():
                table = csv.open_csv(source.stream, read_options, parse_options, convert_options)
        except Exception as e:  # pyarrow's errors, the decompressor's: see failed()
            failed(e)
            return
        while True:
            try:
                with invalid.quiet():
                    batch = table.read_next_batch()
            except StopIteration:
                break
            except Exception as e:
                count_bad_rows()
                failed(e)
                return
            skipped = count_bad_rows()  # stops the run at a bad row unless skip_bad
            rows += batch.num_rows + skipped
            values = batch.column(0)
            pieces = max(1, -(-values.nbytes // block_bytes))  # the workers get blocks of about block_bytes
            step = max(1, -(-len(values) // pieces))
            for start in range(0, max(len(values), 1), step):
                piece = values.slice(start, step)
                yield piece, len(piece) + (skipped if start == 0 else 0)
        rows += count_bad_rows()

    try:
        for block in reader.blocks(batches(), block_bytes):
            position = min(reader.size, source.position())
            block.progress, reported = max(position - reported, 0), max(position, reported)
            yield block
        if reported < reader.size:  # a header alone, or rows skipped at the end: the bar ends at the size
            yield TableBlock(b"", 0, reader.size - reported)
    finally:
        source.close()


def _missing_column(item: InputFile, text_field: str, pa, delimiter: str) -> str:
    """Why the text column is not there: the columns the header names, and what to do."""
    source, invalid = _CsvSource(item, pa), _InvalidRows()
    try:
        with invalid.quiet():
            names = pa.csv.open_csv(source.stream, pa.csv.ReadOptions(use_threads=False),
                                    pa.csv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                                        invalid_row_handler=invalid)).schema.names
        columns = ", ".join(repr(n if len(n) <= 40 else n[:37] + "...") for n in names[:12])
        columns = f"columns: {columns}{', ...' if len(names) > 12 else ''}"
    except Exception as e:
        columns = f"its header cannot be read: {_reason(e)}"
    finally:
        source.close()
    flat = " (CSV columns are flat: a dotted name is a column of that name)" if "." in text_field else ""
    return (f"no column {text_field!r} in the header ({columns}); --text-field names the text column{flat}; "
            f"a file of plain text, one text a line, should be named .txt{item.compression}")


def _bad_row(item: InputFile, delimiter: str, row) -> str:
    """Where a row of the wrong field count is and what it is: file:line, found by reading the file
    again with Python's csv module (done once, for the first bad row of a file)."""
    line = _line_of_row(item, delimiter, row.number) if row.number is not None else None
    text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
    what = f"{row.actual_columns} fields where the header has {row.expected_columns} ({text!r})"
    if row.actual_columns > row.expected_columns:
        what += "; a value holding the delimiter must be quoted"
    if line is not None:
        return f"{item.path}:{line}: {what}"
    if row.number is not None:
        return f"{item.path}: row {row.number} (the header is row 1): {what}"
    return f"{item.path}: a row of {what}"


def _line_of_row(item: InputFile, delimiter: str, number: int) -> int | None:
    """The line (from 1) where row ``number`` of a CSV file starts, rows counted as pyarrow counts
    them (the header is row 1, blank lines are no rows); None where the file cannot be read so far."""
    import csv

    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, CSV_READ_BYTES))
    try:
        with open(item.path, "rb") as raw:
            text = io.TextIOWrapper(io.BufferedReader(ReadableStream(open_binary(item, raw)), 1 << 20),
                                    encoding="utf-8", errors="replace", newline="")
            records = csv.reader(text, delimiter=delimiter)
            rows = line = 0
            for record in records:
                if record:
                    rows += 1
                    if rows == number:
                        return line + 1
                line = records.line_num
    except (csv.Error, ValueError, EOFError, OSError, lzma.LZMAError, zlib.error):
        return None
    finally:
        csv.field_size_limit(limit)
    return None


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
