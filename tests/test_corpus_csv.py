"""CSV and TSV corpora (a header row, the text in the --text-field column): what someone else's
csv module wrote gives what the same texts as plain text give; rows of the wrong field count,
a missing column, invalid UTF-8, empty and damaged files end in a result or in one line."""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os

import pytest

# The corpora extra (make test installs it); without it, skip.
pa = pytest.importorskip("pyarrow")
zstandard = pytest.importorskip("zstandard")

from data_tools.inputs import InputFile, detect_format
from data_tools.tables import BadRecord, BadRecords, read_csv
from test_corpus_formats import (COUNT_KEYS, corpus_lines, damaged_copies_end_in_a_result_or_one_line, prepare,
                                 shard_bytes)

COMPRESS = {"": lambda data: data, ".gz": gzip.compress, ".bz2": lambda data: bz2.compress(data, 1),
            ".xz": lzma.compress, ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}
FLAGS = ["--heldout-fraction", 0.2, "--shard-lines", 70, "--workers", 1]


def texts():
    """Values a CSV writer must quote or that a reader could take for something else than text."""
    values = corpus_lines(300, seed=4)
    values[3] = "Hello, world. \"Quoted\", she said; a, b, c"
    values[10] = "first line\nsecond line, with a comma\nthird"
    values[11] = "12345"  # looks like a number: stays text
    values[12] = "007"  # a number would lose its zeros
    values[13] = "3.50"
    values[14] = "naïve café 日本語 \U0001f600 emoji"
    values[15] = "a\ttab inside"  # TSV quotes it
    values[16] = "\"starts with a quote"
    values[17] = ""  # empty: dropped as an empty line is
    values[18] = "NULL"  # what some readers take for a missing value
    values[19] = "trailing delimiter,"
    return values


def write_table(values, delimiter=",", extra=True) -> bytes:
    """What Python's csv module writes (the excel dialect: \\r\\n row ends, minimal quoting)."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter)
    writer.writerow(["id", "text", "label", "score"] if extra else ["text"])
    for i, value in enumerate(values):
        writer.writerow([i, value, f"label {i % 3}", i * 0.5] if extra else [value])
    return out.getvalue().encode("utf-8")


def plain_text(values) -> bytes:
    return ("\n".join(values) + "\n").encode("utf-8")  # a value holding newlines is several lines


def result(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return (shard_bytes(out), (out / "vocab_counts.tsv").read_bytes(), {k: manifest[k] for k in COUNT_KEYS},
            (sum(e["lines"] for e in manifest["inputs"]), sum(e["empty"] for e in manifest["inputs"])))


def test_csv_and_tsv_give_what_the_same_texts_as_plain_text_give(tmp_path, capsys):
    values = texts()
    (tmp_path / "plain.txt").write_bytes(plain_text(values))
    inputs = {f"table.csv{suffix}": compress(write_table(values)) for suffix, compress in COMPRESS.items()}
    inputs["table.tsv"] = write_table(values, "\t")
    inputs["table.tsv.zst"] = COMPRESS[".zst"](write_table(values, "\t"))
    inputs["only_text.csv"] = write_table(values, extra=False)
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    assert b'"Hello, world. ""Quoted"", she said; a, b, c"' in inputs["table.csv"]  # the writer quoted it
    assert prepare(capsys, tmp_path / "plain.txt", "-o", tmp_path / "out-plain", *FLAGS)[0] == 0
    plain = result(tmp_path / "out-plain")
    assert plain[3] == (302, 2) and len(plain[0]) > 2  # 300 values, one of three lines, two empty
    lines = set()
    for shard in plain[0].values():
        lines |= set(shard.decode().splitlines())
    assert {"Hello, world. \"Quoted\", she said; a, b, c", "007", "3.50", "NULL", "a tab inside"} <= lines
    for name in inputs:
        out = tmp_path / f"out-{name}"
        status, _, err = prepare(capsys, tmp_path / name, "-o", out, *FLAGS)
        assert status == 0, (name, err)
        assert result(out) == plain, name
        manifest = json.loads((out / "manifest.json").read_text())
        entry = manifest["inputs"][0]
        assert entry["format"] == {"table.csv": "csv", "table.tsv": "tsv", "only_text.csv": "csv"}.get(
            name, name.split(".", 1)[1].replace(".", "+")), name
        assert entry["records"] == 300 and entry["bad_records"] == 0 and manifest["text_field"] == "text"


def test_a_column_of_numbers_is_text(tmp_path, capsys):
    values = ["1", "007", "3.50", "-2", "1e5", "12345678901234567890", "true", "nan"]
    (tmp_path / "numbers.csv").write_bytes(write_table(values))
    status, _, err = prepare(capsys, tmp_path / "numbers.csv", "-o", tmp_path / "out", "--heldout-fraction", 0,
                             "--workers", 1)
    assert status == 0, err
    assert sorted((tmp_path / "out" / "train" / "shard-00000.txt").read_text().splitlines()) == sorted(values)
    # --text-field names another column: its numbers, as written
    status, _, err = prepare(capsys, tmp_path / "numbers.csv", "-o", tmp_path / "ids", "--heldout-fraction", 0,
                             "--workers", 1, "--text-field", "score")
    assert status == 0, err
    assert sorted((tmp_path / "ids" / "train" / "shard-00000.txt").read_text().splitlines()) == \
        sorted(str(i * 0.5) for i in range(len(values)))


def _bad_rows_file(delimiter=","):
    d = delimiter
    return (f'id{d}text\r\n1{d}"a value\nover two lines"\r\n\r\n2{d}good two\r\n3{d}one{d}too many\r\n'
            f"4{d}good four\r\nno delimiter here\r\n5{d}good five\r\n").encode()


@pytest.mark.parametrize("name", ["rows.csv", "rows.csv.gz", "rows.tsv"])
def test_rows_of_the_wrong_field_count_stop_the_run_or_are_counted(tmp_path, capsys, name):
    data = _bad_rows_file("\t" if ".tsv" in name else ",")
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    (tmp_path / "ok.txt").write_text("ok line\n")
    path, out = tmp_path / name, tmp_path / "out"
    status, _, err = prepare(capsys, tmp_path / "ok.txt", path, "-o", out, "--workers", 1)
    # line 6: the header, a value of two lines, a blank line, then the row of three fields
    assert status == 2 and f"{path}:6: 3 fields where the header has 2" in err and "--skip-bad" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out.exists()

    status, stdout, err = prepare(capsys, tmp_path / "ok.txt", path, "-o", out, "--workers", 1, "--skip-bad",
                                  "--heldout-fraction", 0)
    assert status == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["inputs"][1]
    assert entry["bad"] == {"field_count": 2} and entry["bad_records"] == 2 and manifest["bad_records"] == 2
    assert entry["records"] == 6 and entry["first_bad"].startswith(f"{path}:6: 3 fields")
    assert sorted((out / "train" / "shard-00000.txt").read_text().splitlines()) == \
        ["a value", "good five", "good four", "good two", "ok line", "over two lines"]
    assert f"skipped bad records: {path}: 2 field count" in stdout


def test_a_missing_text_column_is_one_line_naming_the_columns(tmp_path, capsys):
    (tmp_path / "body.csv").write_bytes(b"id,body\n1,some text\n")
    status, _, err = prepare(capsys, tmp_path / "body.csv", "-o", tmp_path / "out", "--workers", 1)
    assert status == 2 and f"{tmp_path / 'body.csv'}: no column 'text' in the header (columns: 'id', 'body')" in err
    assert "--text-field" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    status, _, err = prepare(capsys, tmp_path / "body.csv", "-o", tmp_path / "out", "--workers", 1,
                             "--text-field", "body", "--heldout-fraction", 0)
    assert status == 0, err
    assert (tmp_path / "out" / "train" / "shard-00000.txt").read_text() == "some text\n"
    # A dotted path: CSV columns are flat
    status, _, err = prepare(capsys, tmp_path / "body.csv", "-o", tmp_path / "o2", "--workers", 1,
                             "--text-field", "meta.body")
    assert status == 2 and "no column 'meta.body'" in err and "CSV columns are flat" in err, err
    # Plain text named .tsv: its first line is taken for the header; the message says to rename it.
    (tmp_path / "notes.tsv.gz").write_bytes(gzip.compress(b"the first sentence\nthe second\n"))
    status, _, err = prepare(capsys, tmp_path / "notes.tsv.gz", "-o", tmp_path / "o3", "--workers", 1)
    assert status == 2 and "notes.tsv.gz: no column 'text'" in err and "'the first sentence'" in err, err
    assert "should be named .txt.gz" in err
    # --skip-bad: the file is one bad record
    (tmp_path / "ok.txt").write_text("ok line\n")
    status, _, err = prepare(capsys, tmp_path / "ok.txt", tmp_path / "body.csv", "-o", tmp_path / "o4", "--workers",
                             1, "--skip-bad")
    assert status == 0, err
    entry = json.loads((tmp_path / "o4" / "manifest.json").read_text())["inputs"][1]
    assert entry["bad"] == {"no_text_column": 1} and "columns: 'id', 'body'" in entry["first_bad"]


def test_invalid_utf8_is_replaced_and_counted_as_in_text_files(tmp_path, capsys):
    (tmp_path / "latin1.csv").write_bytes("id,text\n1,café crème\n2,plain\n".encode("latin-1"))
    status, stdout, err = prepare(capsys, tmp_path / "latin1.csv", "-o", tmp_path / "out", "--workers", 1,
                                  "--heldout-fraction", 0)
    assert status == 0, err
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"][0]
    assert entry["invalid_utf8"] == 2 and entry["first_invalid_line"] == 1 and entry["records"] == 2
    assert sorted((tmp_path / "out" / "train" / "shard-00000.txt").read_text().splitlines()) == \
        ["caf\ufffd cr\ufffdme", "plain"]
    assert "invalid UTF-8" in stdout and "latin1.csv" in stdout


def test_empty_and_header_only_files(tmp_path, capsys):
    files = {"empty.csv": b"", "header.csv": b"id,text\r\n", "blank.tsv": b"\n\n\n", "empty.csv.gz": gzip.compress(b""),
             "header.csv.zst": COMPRESS[".zst"](b"text\n")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "ok.txt").write_text("ok line\n")
    status, _, err = prepare(capsys, *(tmp_path / n for n in files), tmp_path / "ok.txt", "-o", tmp_path / "out",
                             "--workers", 1, "--heldout-fraction", 0)
    assert status == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(e["records"], e["lines"], e["bad_records"]) for e in manifest["inputs"]] == [(0, 0, 0)] * 5 + [(0, 1, 0)]
    status, _, err = prepare(capsys, tmp_path / "header.csv", "-o", tmp_path / "o2", "--workers", 1)
    assert status == 2 and "no training sentences" in err and "Traceback" not in err, err
    status, _, err = prepare(capsys, tmp_path / "empty.csv", "-o", tmp_path / "o3", "--workers", 1)
    assert status == 2 and "the input is empty" in err, err


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_csv_cut_or_damaged(tmp_path, capsys, suffix):
    values = [f"row {i} " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(i % 9 + 1)) for i in range(30000)]
    data = COMPRESS[suffix](write_table(values))
    cut = tmp_path / f"cut.csv{suffix}"
    cut.write_bytes(data[:len(data) // 2])
    (tmp_path / "ok.txt").write_text("ok line\n")
    status, _, err = prepare(capsys, tmp_path / "ok.txt", cut, "-o", tmp_path / "out", "--workers", 1)
    assert status == 2 and f"cut.csv{suffix}: truncated: the " in err and "--skip-bad" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not (tmp_path / "out").exists()
    status, stdout, err = prepare(capsys, tmp_path / "ok.txt", cut, "-o", tmp_path / "out", "--workers", 1,
                                  "--skip-bad", "--heldout-fraction", 0)
    assert status == 0, err
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"][1]
    assert entry["bad"] == {"truncated": 1} and "truncated" in entry["first_bad"] and "skipped bad records" in stdout

    damaged = bytearray(data)
    damaged[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    cut.write_bytes(bytes(damaged))
    status, _, err = prepare(capsys, tmp_path / "ok.txt", cut, "-o", tmp_path / "d1", "--workers", 1)
    assert status == 2 and f"cut.csv{suffix}" in err and len(err.strip().splitlines()) == 1, err
    status, _, err = prepare(capsys, tmp_path / "ok.txt", cut, "-o", tmp_path / "d2", "--workers", 1, "--skip-bad")
    assert status == 0, err
    entry = json.loads((tmp_path / "d2" / "manifest.json").read_text())["inputs"][1]
    assert entry["bad_records"] >= 1 and entry["lines"] < 30000


def test_a_cut_stream_keeps_complete_rows_before_it(tmp_path):
    """Read in small blocks: the rows of the blocks parsed before the cut come out, in order, each whole;
    the row the cut goes through does not (the reader never sees the stream end). pyarrow reads up to
    32 blocks ahead of its parsing (1 MB here), and the rows of those are lost."""
    values = [f"row {i} " + "x" * (i % 40) + " y" * 80 for i in range(20000)]  # 4 MB
    data = gzip.compress(write_table(values))
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[:int(len(data) * 0.7)])
    bad = BadRecords()
    blocks = list(read_csv(detect_format(str(path)), "text", True, bad, block_bytes=8 << 10, read_bytes=32 << 10))
    kept = b"".join(b.data for b in blocks).decode().splitlines()
    assert 2000 < len(kept) < 20000 and kept == values[:len(kept)]
    assert bad.counts == {"truncated": 1} and f"after {len(kept):,} rows" in bad.first
    with pytest.raises(BadRecord, match=r"cut.csv.gz: truncated: the gzip stream ends early"):
        list(read_csv(detect_format(str(path)), "text", False, BadRecords(), read_bytes=32 << 10))


def test_a_row_longer_than_the_blocks_ends_the_reading_in_one_line(tmp_path):
    path = tmp_path / "long.csv"
    path.write_bytes(b'id,text\n1,first\n2,"' + b"x" * (300 << 10) + b'"\n3,after\n')
    bad = BadRecords()
    blocks = list(read_csv(detect_format(str(path)), "text", True, bad, read_bytes=64 << 10))
    assert b"".join(b.data for b in blocks) == b"first\n" and sum(b.progress for b in blocks) == os.path.getsize(path)
    assert bad.counts == {"unreadable_block": 1}
    assert "long.csv: cannot be read after 1 row (a row longer than 0.0625 MB, or a quote that is never closed)" \
        in bad.first
    assert len(list(read_csv(detect_format(str(path)), "text", False, BadRecords()))) == 1  # 4 MB blocks: read


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_progress_ends_at_the_file_size(tmp_path, suffix):
    values = corpus_lines(3000, seed=6)
    path = tmp_path / f"table.csv{suffix}"
    path.write_bytes(COMPRESS[suffix](write_table(values)))
    blocks = list(read_csv(detect_format(str(path)), "text", False, BadRecords(), block_bytes=4 << 10,
                           read_bytes=16 << 10))
    assert b"".join(b.data for b in blocks).decode().split("\n")[:-1] == values
    assert len(blocks) > 5 and all(b.progress >= 0 for b in blocks) and sum(b.rows for b in blocks) == 3000
    assert sum(b.progress for b in blocks) == os.path.getsize(path)
    assert max(len(b.data) for b in blocks) < 2 * (4 << 10)  # the workers get small blocks
    (tmp_path / "header.csv").write_bytes(b"id,text\n")
    blocks = list(read_csv(InputFile(str(tmp_path / "header.csv"), "csv"), "text", False, BadRecords()))
    assert [(b.data, b.rows, b.progress) for b in blocks] == [(b"", 0, 8)]


def test_names_are_checked_against_the_content(tmp_path, capsys):
    (tmp_path / "fake.csv.gz").write_bytes(b"id,text\n1,a\n")
    (tmp_path / "hidden.tsv").write_bytes(gzip.compress(b"id\ttext\n1\ta\n"))
    for name, words in (("fake.csv.gz", "the name says gzip, the content is not compressed"),
                        ("hidden.tsv", "gzip-compressed data in a file not named so")):
        status, _, err = prepare(capsys, tmp_path / name, "-o", tmp_path / "out", "--workers", 1)
        assert status == 2 and name in err and words in err, err


NO_UNRAISABLE = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@NO_UNRAISABLE
def test_a_bad_row_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """pyarrow decodes a bad row as strict UTF-8 before the row handler sees it: for one that is not
    UTF-8 it printed a traceback ("Exception ignored in") and stopped reading with a parse error."""
    (tmp_path / "latin1.csv").write_bytes("id,text\n1,ok\n2,café,extra\n3,after\n".encode("latin-1"))
    (tmp_path / "notes.tsv").write_bytes("caf\xe9\tthe first line\n2\n3\tb\tc\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("ok line\n")
    status, _, err = prepare(capsys, tmp_path / "latin1.csv", "-o", tmp_path / "out", "--workers", 1)
    assert status == 2 and "latin1.csv" in err and "wrong field count that is not UTF-8" in err, err
    assert len(err.strip().splitlines()) == 1
    status, _, err = prepare(capsys, tmp_path / "notes.tsv", "-o", tmp_path / "out", "--workers", 1)
    assert status == 2 and "notes.tsv: no column 'text'" in err and len(err.strip().splitlines()) == 1, err
    status, _, err = prepare(capsys, tmp_path / "ok.txt", tmp_path / "latin1.csv", "-o", tmp_path / "out",
                             "--workers", 1, "--skip-bad")
    assert status == 0 and err == "", err
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"][1]
    assert entry["bad_records"] == 1 and "not UTF-8" in entry["first_bad"]


@NO_UNRAISABLE
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".tsv.zst"])
def test_damaged_csv_ends_in_a_result_or_one_line(tmp_path, capsys, suffix):
    from hypothesis import strategies as st

    table = write_table(texts()[:80], "\t" if ".tsv" in suffix else ",")
    # the bytes that matter to a CSV parser, rather than any byte
    damaged_copies_end_in_a_result_or_one_line(tmp_path, capsys, COMPRESS[suffix[4:]](table), suffix,
                                               st.sampled_from(b'",\t\n\r\x00\xffa'))


def test_without_pyarrow_the_extra_is_named(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.split(".")[0] == "pyarrow":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    (tmp_path / "a.csv").write_bytes(b"id,text\n1,a\n")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    status, _, err = prepare(capsys, tmp_path / "a.csv", "-o", tmp_path / "out", "--workers", 1)
    assert status == 2 and "pip install 'bilm[corpora]'" in err and "CSV" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
