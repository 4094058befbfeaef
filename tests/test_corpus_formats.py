"""Corpora as they come: JSON lines (compressed or not), Parquet and Hugging Face ``save_to_disk``
directories give what the plain text they were made from gives; bad records stop the run or are
counted; the Moses tokenizer and the sentence splitter travel with the model through export, embed
(PyTorch and ONNX), score and evaluate."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random

import h5py
import numpy as np
import pytest

# The corpora extra (make test installs it); without it, as on the GPU check's bare interpreter, skip.
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

from bilm import ElmoEmbedder
from bilm.cli import main as bilm_main
from bilm.core.text import TextPipeline
from bilm.data import load_manifest
from data_tools.inputs import InputFile
from data_tools.prepare import main as prepare_main
from data_tools.tables import BadRecords, read_parquet
from train_helpers import ROOT

COMPRESS = {".gz": gzip.compress, ".bz2": lambda data: bz2.compress(data, 1),  # 100 kB blocks: a cut keeps some
            ".xz": lzma.compress, ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def prepare(capsys, *argv):
    status = prepare_main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return status, out, err


def corpus_lines(n=400, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)] + ["naïve", "日本", "a\u00e9b"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]
    lines[7] = ""  # an empty line: dropped and counted the same way everywhere
    lines[50] = "  two   spaces\tand a tab "
    return lines


def write_hf_dataset(directory, lines, column="text", batch_rows=64, stream=True):
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow IPC stream files, state.json, dataset_info.json."""
    os.makedirs(directory)
    table = pa.table({column: pa.array(lines, pa.string()), "id": pa.array(range(len(lines)))})
    files = []
    for k, start in enumerate(range(0, len(lines), len(lines) // 2 + 1)):
        name = f"data-{k:05d}-of-00002.arrow"
        part = table.slice(start, len(lines) // 2 + 1)
        with pa.OSFile(str(directory / name), "wb") as sink:
            writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
            for batch in part.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
            writer.close()
        files.append({"filename": name})
    (directory / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "abc",
                                                      "_format_type": None, "_split": None}))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {column: {"dtype": "string",
                                                                                    "_type": "Value"}}}))


def shard_bytes(out):
    manifest = load_manifest(str(out / "manifest.json"))
    return {os.path.relpath(p, str(out)): open(p, "rb").read()
            for split in ("train", "heldout") for p in manifest[split]["shards"]}


COUNT_KEYS = ("n_train_sentences", "n_train_tokens", "n_heldout_sentences", "n_heldout_tokens", "vocab_size",
              "distinct_train_tokens", "duplicates_removed")


def test_every_format_gives_the_same_shards_vocab_and_counts(tmp_path, capsys):
    lines = corpus_lines()
    text = ("\n".join(lines) + "\n").encode("utf-8")
    jsonl = "".join(json.dumps({"text": line, "id": i}, ensure_ascii=i % 2 == 0) + "\n"
                    for i, line in enumerate(lines)).encode("utf-8")
    inputs = {"plain.txt": text, "plain.jsonl": jsonl, "plain.json": jsonl}
    for suffix, compress in COMPRESS.items():
        inputs[f"plain.jsonl{suffix}"] = compress(jsonl)
    inputs["plain.txt.zst"] = COMPRESS[".zst"](text)
    sources = {}
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
        sources[name] = [tmp_path / name]
    pq.write_table(pa.table({"text": lines, "n": list(range(len(lines)))}), tmp_path / "plain.parquet",
                   row_group_size=90)
    sources["plain.parquet"] = [tmp_path / "plain.parquet"]
    (tmp_path / "pq_dir").mkdir()  # a directory of Parquet files
    for k in range(3):
        pq.write_table(pa.table({"text": lines[k * 134:(k + 1) * 134]}), tmp_path / "pq_dir" / f"part-{k}.parquet",
                       row_group_size=50)
    sources["pq_dir"] = [tmp_path / "pq_dir"]
    write_hf_dataset(tmp_path / "hf", lines)
    sources["hf"] = [tmp_path / "hf"]
    write_hf_dataset(tmp_path / "hf_file_format", lines, stream=False)
    sources["hf_file_format"] = [tmp_path / "hf_file_format"]

    flags = ["--heldout-fraction", 0.2, "--shard-lines", 70, "--workers", 1]
    results = {}
    for name, paths in sources.items():
        out = tmp_path / f"out-{name}"
        status, stdout, err = prepare(capsys, *paths, "-o", out, *flags)
        assert status == 0, (name, err)
        manifest = json.loads((out / "manifest.json").read_text())
        results[name] = (shard_bytes(out), (out / "vocab_counts.tsv").read_bytes(),
                         {k: manifest[k] for k in COUNT_KEYS},
                         (sum(e["lines"] for e in manifest["inputs"]), sum(e["empty"] for e in manifest["inputs"])))
        if not name.startswith("plain.txt"):
            assert manifest["text_field"] == "text" and manifest["bad_records"] == 0
    plain = results.pop("plain.txt")
    assert plain[3] == (400, 1) and len(plain[0]) > 2
    for name, result in results.items():
        assert result == plain, name
    manifest = json.loads((tmp_path / "out-plain.jsonl.zst" / "manifest.json").read_text())
    assert manifest["inputs"][0]["format"] == "jsonl+zst" and manifest["inputs"][0]["records"] == 400
    # Two workers read the same blocks the same way.
    status, _, err = prepare(capsys, tmp_path / "plain.jsonl.gz", "-o", tmp_path / "two", *flags[:-2], "--workers", 2)
    assert status == 0, err
    assert shard_bytes(tmp_path / "two") == plain[0]


def test_values_with_newlines_are_lines_and_the_json_is_decoded(tmp_path, capsys):
    records = [{"text": "first line\nsecond line"}, {"text": "caf\u00e9 \\ \"quoted\""}, {"text": "\ud83d lone"},
               {"text": "\U0001f600 emoji"}]
    upper = '{"text": "\\uDE00 upper"}\n'  # an escape in capitals: a lone surrogate too
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n   \n" + upper)
    status, _, err = prepare(capsys, tmp_path / "a.jsonl", "-o", tmp_path / "out", "--heldout-fraction", 0,
                             "--workers", 1)
    assert status == 0, err
    lines = (tmp_path / "out" / "train" / "shard-00000.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == sorted(["first line", "second line", 'café \\ "quoted"', "\ufffd lone",
                                    "\U0001f600 emoji", "\ufffd upper"])
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"][0]
    assert (entry["records"], entry["lines"], entry["invalid_utf8"]) == (5, 6, 2)  # blank lines are no records


def test_nested_field_paths(tmp_path, capsys):
    lines = corpus_lines(120, seed=3)
    lines[7] = "x"
    (tmp_path / "plain.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "nested.jsonl").write_text(
        "".join(json.dumps({"meta": {"body": line, "lang": "en"}, "text": "not this"}) + "\n" for line in lines))
    struct = pa.array([{"body": line, "lang": "en"} for line in lines])
    pq.write_table(pa.table({"meta": struct, "text": ["not this"] * len(lines)}), tmp_path / "nested.parquet",
                   row_group_size=40)
    common = ["--heldout-fraction", 0.1, "--workers", 1]
    assert prepare(capsys, tmp_path / "plain.txt", "-o", tmp_path / "plain", *common)[0] == 0
    want = shard_bytes(tmp_path / "plain")
    for name in ("nested.jsonl", "nested.parquet"):
        status, _, err = prepare(capsys, tmp_path / name, "-o", tmp_path / f"out-{name}", "--text-field", "meta.body",
                                 *common)
        assert status == 0, err
        assert shard_bytes(tmp_path / f"out-{name}") == want, name
        # A path that is not there: one line naming the field and where.
        status, _, err = prepare(capsys, tmp_path / name, "-o", tmp_path / f"bad-{name}", "--text-field",
                                 "meta.title", *common)
        assert status == 2 and "'title'" in err and "'meta'" in err and name in err, err
        assert not (tmp_path / f"bad-{name}").exists()
        status, _, err = prepare(capsys, tmp_path / name, "-o", tmp_path / f"bad2-{name}", "--text-field",
                                 "meta.lang.code", *common)
        assert status == 2 and name in err and ("not a struct" in err or "no field 'code'" in err), err


@pytest.mark.parametrize("suffix", list(COMPRESS))
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_compressed_inputs_cut_mid_stream(tmp_path, capsys, suffix, fmt):
    lines = [f"line {i} " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(i % 9 + 1)) for i in range(30000)]
    raw = "".join((json.dumps({"text": line}) if fmt == "jsonl" else line) + "\n" for line in lines).encode()
    data = COMPRESS[suffix](raw)
    good = tmp_path / f"good.{fmt}{suffix}"
    good.write_bytes(COMPRESS[suffix]("\n".join(["alpha beta", "gamma"]).encode() if fmt == "txt" else
                                      b'{"text": "alpha beta"}\n{"text": "gamma"}\n'))
    cut = tmp_path / f"cut.{fmt}{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    status, _, err = prepare(capsys, good, cut, "-o", out, "--workers", 1, "--heldout-fraction", 0)
    assert status == 2 and f"cut.{fmt}{suffix}: truncated" in err and "--skip-bad" in err, err
    assert "Traceback" not in err and not out.exists()  # nothing written

    status, stdout, err = prepare(capsys, good, cut, "-o", out, "--workers", 1, "--heldout-fraction", 0,
                                  "--skip-bad")
    assert status == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["inputs"][1]
    assert entry["bad"] == {"truncated": 1} and entry["bad_records"] == 1 and "truncated" in entry["first_bad"]
    assert manifest["inputs"][0]["bad_records"] == 0 and manifest["bad_records"] == 1
    kept = (out / "train" / "shard-00000.txt").read_text().splitlines()
    assert 1000 < entry["lines"] < 30000
    # the complete lines before the cut, the cut line dropped: a prefix of the file
    assert sorted(set(kept) - {"alpha beta", "gamma"}) == sorted(lines[:entry["lines"]])
    assert "skipped bad records" in stdout and "truncated" in stdout

    # Damaged in the middle (bytes overwritten, not cut): the same choice. Most formats notice at the
    # damaged block ("damaged"); gzip checks its CRC only at the end, so garbage lines may come first.
    damaged = bytearray(data)
    damaged[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    cut.write_bytes(bytes(damaged))
    status, _, err = prepare(capsys, good, cut, "-o", tmp_path / "d1", "--workers", 1, "--heldout-fraction", 0)
    assert status == 2 and f"cut.{fmt}{suffix}" in err and "--skip-bad" in err and "Traceback" not in err, err
    status, _, err = prepare(capsys, good, cut, "-o", tmp_path / "d2", "--workers", 1, "--heldout-fraction", 0,
                             "--skip-bad")
    assert status == 0, err
    entry = json.loads((tmp_path / "d2" / "manifest.json").read_text())["inputs"][1]
    assert entry["bad_records"] >= 1 and entry["lines"] < 30000
    if suffix != ".gz":
        assert entry["bad"] == {"damaged": 1} and entry["lines"] > 1000  # the lines before the damage are kept


def test_bad_json_records_stop_the_run_or_are_skipped_and_counted(tmp_path, capsys):
    records = ['{"text": "good one"}', "this is not json", '{"text": "good two"}', '["an", "array"]',
               '{"title": "no text"}', '{"text": 17}', '{"text": null}', '{"text": ["a"]}', '{"text": "good three"',
               '{"text": "good four"}']
    bad_file = tmp_path / "mixed.jsonl"
    bad_file.write_text("\n".join(records) + "\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_text('{"text": "clean a"}\n{"text": "clean b"}\n')
    out = tmp_path / "out"
    status, _, err = prepare(capsys, clean, bad_file, "-o", out, "--workers", 1)
    assert status == 2 and f"{bad_file}:2: not JSON" in err and "--skip-bad" in err, err
    assert "Traceback" not in err and not out.exists()

    status, stdout, err = prepare(capsys, clean, bad_file, "-o", out, "--workers", 2, "--skip-bad",
                                  "--heldout-fraction", 0)
    assert status == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["inputs"][1]
    assert entry["bad"] == {"not_json": 2, "not_object": 1, "no_field": 1, "not_string": 3}
    assert entry["bad_records"] == 7 and entry["records"] == 10 and entry["first_bad"].startswith(f"{bad_file}:2: ")
    assert manifest["inputs"][0]["bad_records"] == 0 and manifest["bad_records"] == 7
    assert sorted((out / "train" / "shard-00000.txt").read_text().splitlines()) == \
        ["clean a", "clean b", "good four", "good one", "good two"]
    assert f"skipped bad records: {bad_file}" in stdout and "3 not string" in stdout


def test_a_json_document_is_refused_with_the_command_that_converts_it(tmp_path, capsys):
    records = [{"text": f"line {i}"} for i in range(3)]
    documents = {"array.json": json.dumps(records, indent=2), "compact.json": json.dumps(records),
                 "object.json": json.dumps({"data": records}, indent=1)}
    for name, text in documents.items():
        (tmp_path / name).write_text(text + "\n")
    (tmp_path / "array.json.gz").write_bytes(gzip.compress(documents["array.json"].encode()))
    expected = {"array.json": "(an array), not JSON lines (one object a line); convert it, e.g. "
                              f"jq -c '.[]' {tmp_path / 'array.json'} > array.jsonl",
                "compact.json": "(an array), not JSON lines", "array.json.gz": "e.g. gzip -dc "
                f"{tmp_path / 'array.json.gz'} | jq -c '.[]' > array.jsonl",
                "object.json": "(an object printed over several lines), not JSON lines (one object a line); "
                               f"convert it, e.g. jq -c '.KEY[]' {tmp_path / 'object.json'} > object.jsonl, KEY the "
                               "key that holds the records"}
    for name, message in expected.items():
        for skip_bad in ([], ["--skip-bad"]):  # a whole file is not a bad record to skip
            status, _, err = prepare(capsys, tmp_path / name, "-o", tmp_path / "out", "--workers", 1, *skip_bad)
            assert status == 2 and err.count("\n") == 1 and f"{tmp_path / name}: one JSON document " in err, err
            assert message in err, err
            assert not (tmp_path / "out").exists()
    # the same records as JSON lines are read
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    status, _, err = prepare(capsys, tmp_path / "lines.jsonl", "-o", tmp_path / "out", "--workers", 1,
                             "--heldout-fraction", 0)
    assert status == 0, err


def test_bad_table_rows_and_files(tmp_path, capsys):
    pq.write_table(pa.table({"text": ["a b", None, "c", None, "d e f"]}), tmp_path / "nulls.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    (tmp_path / "ok.txt").write_text("ok line\n")
    status, _, err = prepare(capsys, tmp_path / "nulls.parquet", "-o", tmp_path / "o1", "--workers", 1)
    assert status == 2 and "nulls.parquet: row group 0, row 1: 'text' is null" in err, err
    status, _, err = prepare(capsys, tmp_path / "numbers.parquet", "-o", tmp_path / "o2", "--workers", 1)
    assert status == 2 and "numbers.parquet: column 'text' holds int64, not strings" in err, err
    status, _, err = prepare(capsys, tmp_path / "broken.parquet", "-o", tmp_path / "o3", "--workers", 1)
    assert status == 2 and "broken.parquet: not a readable Parquet file" in err, err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))

    status, stdout, err = prepare(capsys, tmp_path / "ok.txt", tmp_path / "nulls.parquet", tmp_path / "numbers.parquet",
                                  tmp_path / "broken.parquet", "-o", tmp_path / "out", "--workers", 1, "--skip-bad",
                                  "--heldout-fraction", 0)
    assert status == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    by_name = {os.path.basename(e["path"]): e for e in manifest["inputs"]}
    assert by_name["nulls.parquet"]["bad"] == {"null": 2} and by_name["nulls.parquet"]["records"] == 5
    assert "row group 0, row 1" in by_name["nulls.parquet"]["first_bad"]
    assert by_name["numbers.parquet"]["bad"] == {"no_text_column": 2}
    assert by_name["broken.parquet"]["bad"] == {"unreadable_file": 1}
    assert manifest["bad_records"] == 5
    assert sorted((tmp_path / "out" / "train" / "shard-00000.txt").read_text().splitlines()) == \
        ["a b", "c", "d e f", "ok line"]


def test_names_are_checked_against_the_content(tmp_path, capsys):
    (tmp_path / "fake.txt.gz").write_text("plain text\n")
    (tmp_path / "hidden.txt").write_bytes(gzip.compress(b"compressed\n"))
    (tmp_path / "text.parquet").write_text("plain text\n")
    (tmp_path / "zst.jsonl.xz").write_bytes(COMPRESS[".zst"](b'{"text": "a"}\n'))
    for name, words in (("fake.txt.gz", "cannot decompress (the name says gzip, the content is not compressed)"),
                        ("hidden.txt", "gzip-compressed data in a file not named so"),
                        ("text.parquet", "not a Parquet file"),
                        ("zst.jsonl.xz", "the name says xz, the content is zstandard data")):
        status, _, err = prepare(capsys, tmp_path / name, "-o", tmp_path / "out", "--workers", 1)
        assert status == 2 and name in err and words in err, err


def test_parquet_is_read_in_bounded_batches(tmp_path, monkeypatch):
    """A file of many row groups: every read is one row group's text column, in batches of at most
    batch_rows rows, never the whole file (the batch size, not the RSS, is what is checked)."""
    lines = [f"row {i} " + "x" * (i % 50) for i in range(5000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": lines, "other": [b"\0" * 100] * len(lines)}), path, row_group_size=1000)
    reads = []
    original = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, columns=None, **kwargs):
        for batch in original(self, batch_size=batch_size, row_groups=row_groups, columns=columns, **kwargs):
            reads.append((tuple(row_groups), tuple(columns), batch.num_rows))
            yield batch

    def whole_file(*args, **kwargs):
        raise AssertionError("read the whole file")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    bad = BadRecords()
    blocks = list(read_parquet(InputFile(str(path), "parquet"), "text", False, bad, batch_rows=128,
                               block_bytes=16 << 10))
    assert b"".join(b.data for b in blocks).decode().splitlines() == lines
    assert sum(b.rows for b in blocks) == 5000 and not bad.counts
    assert max(n for _, _, n in reads) == 128 and len(reads) >= 5000 // 128
    assert {groups for groups, _, _ in reads} == {(g,) for g in range(5)}  # one row group at a time
    assert {columns for _, columns, _ in reads} == {("text",)}  # only the text column
    assert len(blocks) > 5 and max(len(b.data) for b in blocks) < (16 << 10) + 128 * 80  # blocks stay small
    assert sum(b.progress for b in blocks) == os.path.getsize(path)


@pytest.mark.parametrize("stream", [True, False])
def test_arrow_progress_follows_the_batches(tmp_path, stream):
    """The progress bar of an Arrow file moves with its record batches and ends at the file's size
    (an IPC file's batches are read at their offsets: the memory map's position never moved)."""
    from data_tools.tables import read_arrow

    lines = corpus_lines(400, seed=2)
    write_hf_dataset(tmp_path / "hf", lines, batch_rows=16, stream=stream)
    path = tmp_path / "hf" / "data-00000-of-00002.arrow"
    blocks = list(read_arrow(InputFile(str(path), "arrow"), "text", False, BadRecords(), block_bytes=256))
    assert b"".join(b.data for b in blocks).decode().split("\n")[:-1] == lines[:201]
    assert len(blocks) > 5 and all(b.progress > 0 for b in blocks)
    assert os.path.getsize(path) - 16 <= sum(b.progress for b in blocks) <= os.path.getsize(path)


def test_dataset_dict_reads_every_split(tmp_path, capsys):
    lines = corpus_lines(100, seed=5)
    root = tmp_path / "dd"
    root.mkdir()
    write_hf_dataset(root / "train", lines[:70])
    write_hf_dataset(root / "test", lines[70:])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    (tmp_path / "plain.txt").write_text("\n".join(lines) + "\n")
    assert prepare(capsys, tmp_path / "plain.txt", "-o", tmp_path / "a", "--workers", 1)[0] == 0
    (tmp_path / "corpora").mkdir()  # a directory holding the dataset directory: its Arrow files, not its JSON
    os.rename(root, tmp_path / "corpora" / "dd")
    assert prepare(capsys, tmp_path / "corpora", "-o", tmp_path / "b", "--workers", 1)[0] == 0
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {k: a[k] for k in COUNT_KEYS} == {k: b[k] for k in COUNT_KEYS}
    assert [e["format"] for e in b["inputs"]] == ["arrow"] * 4
    assert (tmp_path / "a" / "vocab_counts.tsv").read_bytes() == (tmp_path / "b" / "vocab_counts.tsv").read_bytes()


def test_dataset_files_that_point_elsewhere_are_refused(tmp_path, capsys):
    """state.json and dataset_dict.json come with a downloaded dataset: they name files and splits
    inside its directory, nothing else (a split "." read itself until Python's recursion limit)."""
    write_hf_dataset(tmp_path / "hf", corpus_lines(60))
    (tmp_path / "outside.arrow").write_bytes((tmp_path / "hf" / "data-00000-of-00002.arrow").read_bytes())
    state = json.loads((tmp_path / "hf" / "state.json").read_text())
    for name in ("../outside.arrow", str(tmp_path / "outside.arrow"), ".", 5):
        (tmp_path / "hf" / "state.json").write_text(json.dumps({**state, "_data_files": [{"filename": name}]}))
        status, _, err = prepare(capsys, tmp_path / "hf", "-o", tmp_path / "out", "--workers", 1)
        assert status == 2 and "state.json: key '_data_files' must list" in err, err
    root = tmp_path / "dd"
    write_hf_dataset(root / "train", corpus_lines(60))
    for splits in (["."], ["train", ""], ["../hf"], "train"):
        (root / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
        status, _, err = prepare(capsys, root, "-o", tmp_path / "out", "--workers", 1)
        assert status == 2 and "dataset_dict.json: key 'splits' must list" in err and "Traceback" not in err, err
    (root / "dataset_dict.json").write_text('{"splits": ["train"')
    status, _, err = prepare(capsys, root, "-o", tmp_path / "out", "--workers", 1)
    assert status == 2 and "dataset_dict.json: not valid JSON" in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- raw text and the Moses tokenizer

RAW = ["The bank of the river was steep, and Dr. Smith didn't climb it.",
       "He said: \"It costs $5.50 & more\" -- then left (quickly).",
       "I can't believe it's 3 p.m. already! We'll see."]


def _raw_corpus(n_lines=260):
    from sacremoses import MosesDetokenizer

    detokenize = MosesDetokenizer("en")
    with open(os.path.join(ROOT, "data", "sample", "train.txt"), encoding="utf-8") as f:
        tokenized = [line.split() for line in f.read().splitlines()[:n_lines] if line.strip()]
    return [detokenize.detokenize(tokens) for tokens in tokenized]


def test_moses_and_sentence_splitting_in_prepare(tmp_path, capsys):
    import sentencex
    from sacremoses import MosesTokenizer

    (tmp_path / "raw.txt").write_text("\n".join(RAW) + "\n")
    status, stdout, err = prepare(capsys, tmp_path / "raw.txt", "-o", tmp_path / "out", "--tokenizer", "moses",
                                  "--split-sentences", "--heldout-fraction", 0, "--workers", 2)
    assert status == 0, err
    lines = (tmp_path / "out" / "train" / "shard-00000.txt").read_text().splitlines()
    moses = MosesTokenizer("en")
    assert "I can 't believe it 's 3 p.m. already !" in lines and "We 'll see ." in lines
    assert 'He said : " It costs $ 5.50 & more " -- then left ( quickly ) .' in lines  # escape=False
    # The lines are sacremoses' tokens of sentencex's sentences, each: the libraries themselves, not bilm.
    assert sorted(lines) == sorted(" ".join(moses.tokenize(sentence, escape=False))
                                   for raw in RAW for sentence in sentencex.segment("en", raw))
    assert len(lines) == 4
    manifest = load_manifest(str(tmp_path / "out" / "manifest.json"))
    assert manifest["tokenizer"]["type"] == "moses" and manifest["tokenizer"]["lang"] == "en"
    assert manifest["sentence_splitter"]["type"] == "sentencex"
    assert manifest["inputs"][0]["extra_from_sentences"] == 1 and "1 extra lines from splitting" in stdout
    pipeline = TextPipeline.from_manifest(manifest)
    assert (pipeline.tokenizer, pipeline.lang, pipeline.split_sentences) == ("moses", "en", "sentencex")
    assert [" ".join(s) for s in pipeline.sentences(RAW)] == [
        line for raw in RAW for line in lines if line in {" ".join(s) for s in pipeline.line_sentences([raw])[0]}]
    # Without splitting, the document line stays one sentence.
    assert prepare(capsys, tmp_path / "raw.txt", "-o", tmp_path / "nosplit", "--tokenizer", "moses", "--heldout-fraction",
                   0, "--workers", 1, "--lang", "de")[0] == 0
    assert len((tmp_path / "nosplit" / "train" / "shard-00000.txt").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "nosplit" / "manifest.json").read_text())["sentence_splitter"] is None


def test_sentencepiece_with_sentence_splitting(tmp_path, capsys):
    """A SentencePiece model trained by prepare on sentences (its sample split as the data is), and
    the pipeline that travels with the data splits and tokenizes raw text as the shards hold it."""
    lines = _raw_corpus(120) + RAW
    (tmp_path / "raw.txt").write_text("\n".join(lines) + "\n")
    status, _, err = prepare(capsys, tmp_path / "raw.txt", "-o", tmp_path / "out", "--tokenizer", "sentencepiece",
                             "--sp-vocab-size", 150, "--split-sentences", "--heldout-fraction", 0, "--workers", 1)
    assert status == 0, err
    manifest = load_manifest(str(tmp_path / "out" / "manifest.json"))
    pipeline = TextPipeline.from_manifest(manifest)
    assert (pipeline.tokenizer, pipeline.split_sentences) == ("sentencepiece", "sentencex")
    assert manifest["inputs"][0]["extra_from_sentences"] > 0
    shards = (tmp_path / "out" / "train" / "shard-00000.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(shards) == sorted(" ".join(s) for s in pipeline.sentences(lines))


def test_old_pipelines_load_as_they_behaved(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "bilm-tokenizer", "format_version": 1,
                                                         "tokenizer": "whitespace", "nfkc": True,
                                                         "control_characters": "removed", "max_tokens_per_line": 400}))
    old = TextPipeline.load(str(tmp_path))
    assert (old.tokenizer, old.lang, old.split_sentences, old.nfkc) == ("whitespace", None, None, True)
    assert old.tokenize_lines(["One. Two three."]) == [["One.", "Two", "three."]]
    assert old.describe()["format_version"] == 1 and "split_sentences" not in old.describe()
    state = {"format": "bilm-tokenizer", "format_version": 1, "tokenizer": "whitespace", "nfkc": False,
             "control_characters": "removed", "max_tokens_per_line": 0, "sp_model_proto": None}
    assert TextPipeline.from_state(state) == TextPipeline()
    newer = TextPipeline("moses", split_sentences="sentencex")
    assert TextPipeline.from_state(newer.to_state()) == newer and newer.describe()["format_version"] == 2
    (tmp_path / "tokenizer.json").write_text(json.dumps({**newer.describe(), "format_version": 3}))
    with pytest.raises(ValueError, match="tokenizer.json: tokenizer format version 3 was written by a newer bilm"):
        TextPipeline.load(str(tmp_path))


def test_pipeline_fields_of_a_handed_over_file_are_checked(tmp_path):
    """tokenizer.json and manifest.json come from elsewhere: a field of the wrong type is one line
    naming the file, not a TypeError later (a language sentencex cannot take, versions not a mapping)."""
    spec = TextPipeline("moses", split_sentences="sentencex").describe()
    for lang in (5, "", ["en"], "en us"):
        (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "lang": lang}))
        with pytest.raises(ValueError, match=r"tokenizer.json: language .*: give a language code"):
            TextPipeline.load(str(tmp_path))
    manifest = {"path": "m.json", "tokenizer": {"type": "moses", "lang": "de", "library_versions": "1.0"},
                "sentence_splitter": {"type": "sentencex", "library_versions": ["x"]}}
    pipeline = TextPipeline.from_manifest(manifest)
    assert (pipeline.lang, pipeline.split_sentences, pipeline.library_versions) == ("de", "sentencex", None)
    with pytest.raises(ValueError, match=r"m.json: language 7"):
        TextPipeline.from_manifest({**manifest, "tokenizer": {"type": "moses", "lang": 7}})


def test_resume_compares_the_language_and_the_sentence_splitter():
    from bilm.runs.checkpoint import CheckpointError
    from bilm.runs.config import config_to_dict
    from bilm.runs.resume import check_resume
    from train_helpers import tiny_config

    config = config_to_dict(tiny_config())
    saved = TextPipeline("moses", split_sentences="sentencex").to_state()
    payload = {"config": config, "vocab": ["<S>", "</S>", "<UNK>"], "text_pipeline": saved}

    def resume(pipeline):
        return check_resume(payload, "ck.pt", config, payload["vocab"], "v.txt", pipeline.to_state())

    assert resume(TextPipeline("moses", lang="en", split_sentences="sentencex")) == []
    with pytest.raises(CheckpointError, match="text_pipeline.split_sentences: checkpoint 'sentencex' vs this run None"):
        resume(TextPipeline("moses"))
    with pytest.raises(CheckpointError, match="text_pipeline.lang: checkpoint 'en' vs this run 'de'"):
        resume(TextPipeline("moses", lang="de", split_sentences="sentencex"))
    # A pipeline saved before these fields (no lang, no split_sentences) is what a whitespace run is.
    payload["text_pipeline"] = {"format": "bilm-tokenizer", "format_version": 1, "tokenizer": "whitespace",
                                "nfkc": False, "max_tokens_per_line": 0, "sp_model_proto": None}
    assert resume(TextPipeline()) == []


@pytest.fixture(scope="module")
def moses_model(tmp_path_factory):
    from bilm.commands.export import export
    from bilm.training.run import train
    from train_helpers import tiny_config

    tmp = tmp_path_factory.mktemp("moses")
    raw = tmp / "raw.jsonl.zst"
    lines = _raw_corpus() + RAW
    raw.write_bytes(COMPRESS[".zst"]("".join(json.dumps({"doc": {"body": line}}) + "\n" for line in lines).encode()))
    out = tmp / "data"
    assert prepare_main([str(raw), "--out", str(out), "--text-field", "doc.body", "--tokenizer", "moses",
                         "--split-sentences", "--heldout-fraction", "0.1", "--workers", "1", "--no-progress"]) == 0
    run = tmp / "run"
    train(tiny_config("train.max_steps=4", "train.checkpoint_every_steps=4"), str(out / "manifest.json"), str(run),
          progress=False)
    export(str(run), str(tmp / "export"), include_softmax=True)
    return out, run, tmp / "export"


def test_raw_text_gets_the_training_tokens_through_every_path(moses_model, tmp_path, monkeypatch):
    from bilm.inference.score import LanguageModelScorer
    from bilm.runs.trained_model import model_from_checkpoint
    from bilm.scoring.evaluate import evaluate

    monkeypatch.setenv("BILM_CACHE", str(tmp_path / "cache"))
    out, run, exported = moses_model
    from_export = TextPipeline.load(str(exported))
    assert from_export == model_from_checkpoint(str(run)).text_pipeline == \
        TextPipeline.from_manifest(load_manifest(str(out / "manifest.json")))
    assert (from_export.tokenizer, from_export.split_sentences) == ("moses", "sentencex")
    spec = json.loads((exported / "tokenizer.json").read_text())
    assert spec["lang"] == "en" and spec["split_sentences"] == "sentencex" and spec["moses"]["escape"] is False
    prepared = set()
    for split in ("train", "heldout"):
        for path in load_manifest(str(out / "manifest.json"))[split]["shards"]:
            prepared |= set(open(path, encoding="utf-8").read().splitlines())

    one_sentence = [RAW[0], RAW[1], "Why won't the 2nd bank's clerk (Mr. Jones) answer?"]
    torch_embedder = ElmoEmbedder(str(exported), stateful=False)
    onnx_embedder = ElmoEmbedder(str(exported), runtime="onnx")
    for raw in one_sentence:
        tokens, vectors = torch_embedder.embed_text(raw)
        assert len(tokens) > 8 and "'t" in tokens or "$" in tokens or "(" in tokens
        assert np.array_equal(vectors, torch_embedder.embed_sentence(tokens))  # the pre-tokenized form
        onnx_tokens, onnx_vectors = onnx_embedder.embed_text(raw)
        assert onnx_tokens == tokens
        assert np.array_equal(onnx_vectors, onnx_embedder.embed_sentence(tokens))
        assert np.abs(onnx_vectors - vectors).max() <= 1e-4  # ONNX against PyTorch: test_onnx's tolerance
    assert " ".join(torch_embedder.embed_text(RAW[0])[0]) in prepared  # the tokens training saw
    # A line of two sentences: embedded as the tokens of both, each tokenized as training tokenized it.
    two = torch_embedder.embed_text(RAW[2])[0]
    assert " ".join(two) == " ".join(" ".join(s) for s in from_export.line_sentences([RAW[2]])[0])
    assert two[:9] == "I can 't believe it 's 3 p.m. already".split()

    # bilm embed: raw text and its pre-tokenized form give the same tokens and vectors.
    (tmp_path / "raw.txt").write_text("\n".join(one_sentence) + "\n")
    (tmp_path / "tok.txt").write_text("\n".join(" ".join(torch_embedder.embed_text(r)[0]) for r in one_sentence) + "\n")
    for runtime in ("torch", "onnx"):
        common = ["--model", str(exported), "--stateless", "--runtime", runtime, "--force"]
        assert bilm_main(["embed", *common, "--input", str(tmp_path / "raw.txt"), "--out", str(tmp_path / "r.h5")]) == 0
        assert bilm_main(["embed", *common, "--input", str(tmp_path / "tok.txt"), "--out", str(tmp_path / "t.h5"),
                          "--pretokenized"]) == 0
        with h5py.File(tmp_path / "r.h5") as r, h5py.File(tmp_path / "t.h5") as t:
            for i in range(len(one_sentence)):
                assert json.loads(r[str(i)].attrs["tokens"]) == json.loads(t[str(i)].attrs["tokens"])
                assert np.array_equal(r[str(i)][...], t[str(i)][...])

    # bilm score and bilm evaluate, from the run and from the export.
    tokenized = [" ".join(torch_embedder.embed_text(r)[0]) for r in one_sentence]
    for model in (str(run), str(exported)):
        raw_scores = LanguageModelScorer(model).score(one_sentence)
        tok_scores = LanguageModelScorer(model, pretokenized=True).score(tokenized)
        for a, b in zip(raw_scores, tok_scores):
            assert a["tokens"] == b["tokens"] and a["forward"] == b["forward"] and a["backward"] == b["backward"]
        two_sentences = LanguageModelScorer(model).score([RAW[2]])[0]
        assert two_sentences["sentences"] == 2  # split as prepare split it
    (tmp_path / "doc.txt").write_text("\n".join(RAW) + "\n")
    (tmp_path / "doc_tok.txt").write_text("\n".join(" ".join(s) for s in from_export.sentences(RAW)) + "\n")
    from_raw = evaluate(str(run), str(tmp_path / "doc.txt"), progress=False, device="cpu")
    from_tok = evaluate(str(run), str(tmp_path / "doc_tok.txt"), progress=False, device="cpu", pretokenized=True)
    for d in ("forward", "backward"):
        assert from_raw[d]["tokens"] == from_tok[d]["tokens"] > 0
        assert from_raw[d]["perplexity"] == pytest.approx(from_tok[d]["perplexity"], rel=1e-9)


def test_missing_extras_are_named(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_extras(name, *args, **kwargs):
        if name.split(".")[0] in ("pyarrow", "zstandard", "sacremoses", "sentencex"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    (tmp_path / "a.parquet").write_bytes(b"PAR1....PAR1")
    (tmp_path / "a.jsonl.zst").write_bytes(COMPRESS[".zst"](b'{"text": "a"}\n'))
    (tmp_path / "a.txt").write_text("a\n")
    monkeypatch.setattr(builtins, "__import__", no_extras)
    for argv, extra in (([tmp_path / "a.parquet"], "corpora"), ([tmp_path / "a.jsonl.zst"], "corpora"),
                        ([tmp_path / "a.txt", "--tokenizer", "moses"], "text"),
                        ([tmp_path / "a.txt", "--split-sentences"], "text")):
        status, _, err = prepare(capsys, *argv, "-o", tmp_path / "out", "--workers", 1)
        assert status == 2 and f"pip install 'bilm[{extra}]'" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- damaged files: a result or one line

def _seed_files(tmp_path):
    lines = corpus_lines(300, seed=9)
    jsonl = "".join(json.dumps({"text": line}) + "\n" for line in lines).encode()
    pq.write_table(pa.table({"text": lines}), tmp_path / "seed.parquet", row_group_size=100)
    write_hf_dataset(tmp_path / "seed_hf", lines)
    return {".jsonl.zst": COMPRESS[".zst"](jsonl), ".jsonl.gz": gzip.compress(jsonl), ".jsonl": jsonl,
            ".parquet": (tmp_path / "seed.parquet").read_bytes(),
            ".arrow": (tmp_path / "seed_hf" / "data-00000-of-00002.arrow").read_bytes()}


def damaged_copies_end_in_a_result_or_one_line(tmp_path, capsys, seed: bytes, suffix: str, byte_values) -> None:
    """Cut and overwritten copies of ``seed`` (a file named ``input{suffix}``; ``byte_values``: the
    hypothesis strategy of the bytes written) end in a prepared corpus, or in exit 2 with one line
    naming the file and nothing written."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    cases = iter(range(10 ** 6))

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(cut=st.integers(0, len(seed) - 1),
           edits=st.lists(st.tuples(st.integers(0, len(seed) - 1), byte_values), max_size=6),
           skip_bad=st.booleans())
    def check(cut, edits, skip_bad):
        data = bytearray(seed)
        for position, value in edits:
            data[position] = value
        data = bytes(data[:cut] if cut % 3 == 0 else data)
        case = tmp_path / f"case-{next(cases)}"
        case.mkdir()
        (case / f"input{suffix}").write_bytes(data)
        status, _, err = prepare(capsys, case / f"input{suffix}", "-o", case / "out", "--workers", 1,
                                 *(["--skip-bad"] if skip_bad else []))
        assert status in (0, 2), err
        if status == 2:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "input" in err, err
            assert not (case / "out").exists()

    check()


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz", ".jsonl", ".parquet", ".arrow"])
def test_damaged_inputs_end_in_a_result_or_one_line(tmp_path, capsys, suffix):
    from hypothesis import strategies as st

    damaged_copies_end_in_a_result_or_one_line(tmp_path, capsys, _seed_files(tmp_path)[suffix], suffix,
                                               st.integers(0, 255))


def test_sentencepiece_trains_on_the_text_field_not_the_json(tmp_path, capsys):
    lines = corpus_lines(300, seed=11)
    (tmp_path / "plain.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": line, "source": "web"}) + "\n"
                                                                for line in lines).encode()))
    common = ["--tokenizer", "sentencepiece", "--sp-vocab-size", 60, "--heldout-fraction", 0.1, "--workers", 1]
    for name in ("plain.txt", "a.jsonl.gz"):
        status, _, err = prepare(capsys, tmp_path / name, "-o", tmp_path / f"out-{name}", *common)
        assert status == 0, err
    import sentencepiece

    def pieces(name):  # the model file also records its path (model_prefix): compare what it holds
        model = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / f"out-{name}" / "sentencepiece.model"))
        return [(model.id_to_piece(i), model.get_score(i)) for i in range(model.get_piece_size())]

    assert pieces("plain.txt") == pieces("a.jsonl.gz") and not any("text" in p or "{" in p for p, _ in
                                                                    pieces("a.jsonl.gz"))
    assert shard_bytes(tmp_path / "out-plain.txt") == shard_bytes(tmp_path / "out-a.jsonl.gz")
