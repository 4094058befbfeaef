"""Parquet files and Arrow IPC files (what Hugging Face ``save_to_disk`` writes) -> blocks of text.

Read in bounded memory: Parquet one row group at a time, in record batches of at most
``BATCH_ROWS`` rows, and only the text column; Arrow files memory-mapped, a record batch at a
time. The text values of a batch are joined with newlines by Arrow itself (no per-row Python), so
a block of a table is read by the workers exactly as a block of a text file: a value holding
newlines is several lines, as it would be in a text file.

A bad value (null, or a row without the field) is a bad record; a row group or a file that cannot
be read, or a column that is missing or does not hold strings, makes all its rows bad. With
``skip_bad`` they are counted (``BadRecords``), else the first one stops the run, named by file,
row group and row (both counted from 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from bilm.core.errors import InputError, MissingExtra
from data_tools.inputs import MISSING_CORPORA_EXTRA, InputFile

BATCH_ROWS = 8192  # rows per record batch read from a Parquet row group
BLOCK_BYTES = 2 << 20  # text handed to a worker at a time: small, so that the workers start while the file is read


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
    """pyarrow (with its compute and parquet modules), or a one-line error naming the extra."""
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingExtra(MISSING_CORPORA_EXTRA.format(what="reading Parquet and Arrow files",
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
        joined = pc.binary_join(lists, pa.scalar("\n", pa.large_string()))[0]
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


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
