import bz2
import gzip
import json
import lzma
import os
import random
from collections import Counter

import pytest

from bilm.data import MANIFEST_FORMAT, MANIFEST_VERSION, LMDataset, load_manifest
from bilm.core.vocab import Vocabulary
from data_tools.prepare import main as prepare_main
from data_tools.shuffle import BucketTask, shuffle_bucket


def prepare(capsys, *argv):
    """Run ``bilm prepare`` in-process; returns (exit status, stdout, stderr)."""
    status = prepare_main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return status, out, err


def random_lines(n, seed=0, words=30):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randint(0, words)}" for _ in range(rng.randint(1, 9))) for _ in range(n)]


def shard_lines(out_dir, section):
    manifest = load_manifest(os.path.join(out_dir, "manifest.json"))
    lines = []
    for path in manifest[section]["shards"]:
        with open(path, encoding="utf-8") as f:
            lines.extend(f.read().splitlines())
    return lines


def test_compressed_inputs_end_to_end(tmp_path, capsys):
    lines = random_lines(300)
    raw = tmp_path / "raw"
    os.makedirs(raw / "sub")
    with gzip.open(raw / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[:100]) + "\n\n   \n")  # plus two empty lines
    with bz2.open(raw / "sub" / "b.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[100:200]) + "\n")
    with lzma.open(tmp_path / "c.xz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[200:]))  # no final newline
    out = tmp_path / "out"
    status, stdout, _ = prepare(capsys, raw, tmp_path / "*.xz", "-o", out, "--shard-lines", 40,
                                "--heldout-fraction", 0.2, "--workers", 1)
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    train, heldout = shard_lines(out, "train"), shard_lines(out, "heldout")
    assert list(manifest)[:2] == ["format", "format_version"]  # written by bilm.data.manifest
    assert (manifest["format"], manifest["format_version"]) == (MANIFEST_FORMAT, MANIFEST_VERSION)
    assert Counter(train + heldout) == Counter(lines)
    assert 20 < len(heldout) < 100
    assert manifest["n_train_sentences"] == len(train)
    assert manifest["n_train_tokens"] == sum(len(line.split()) for line in train)  # words, no <S> </S>
    assert manifest["n_heldout_tokens"] == sum(len(line.split()) for line in heldout)
    assert all(n <= 40 for n in manifest["train"]["shard_sentences"])
    assert manifest["train"]["shards"][0] == "train/shard-00000.txt"  # relative to the manifest
    assert [entry["lines"] for entry in manifest["inputs"]] == [102, 100, 100]
    assert sum(entry["empty"] for entry in manifest["inputs"]) == 2
    assert manifest["bilm_version"] and "prepare" in manifest["command"]
    # vocabulary: specials, then descending training counts, ties by token
    counts = Counter(token for line in train for token in line.split())
    vocab = Vocabulary.from_file(out / "vocab.txt")
    assert vocab.tokens[3:] == sorted(counts, key=lambda t: (-counts[t], t))
    assert manifest["vocab_size"] == len(vocab) == len(counts) + 3
    tsv = [line.split("\t") for line in (out / "vocab_counts.tsv").read_text().splitlines()]
    assert tsv[0] == ["<S>", str(len(train))] and tsv[2] == ["<UNK>", "0"]
    assert {t: int(c) for t, c in tsv[3:]} == counts
    heldout_tokens = [t for line in heldout for t in line.split()]
    oov = sum(t not in counts for t in heldout_tokens) / len(heldout_tokens)
    assert manifest["heldout_oov_rate"] == pytest.approx(oov)
    assert f"{manifest['n_train_tokens']:,} tokens" in stdout
    # and the reader takes it from there
    batch = next(iter(LMDataset(out / "manifest.json", None, 4, 5)))
    assert batch["forward"]["mask"].all()


def test_bad_utf8_is_replaced_and_reported(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nstill good\nbad \xff\xfe here\nand \xc3 there\n")
    out = tmp_path / "out"
    status, stdout, _ = prepare(capsys, path, "-o", out, "--heldout-fraction", 0, "--workers", 1)
    assert status == 0
    entry = json.loads((out / "manifest.json").read_text())["inputs"][0]
    assert entry["invalid_utf8"] == 3 and entry["first_invalid_line"] == 3
    assert f"{path}: 3 byte sequences replaced" in stdout and "line 3" in stdout
    assert sorted(shard_lines(out, "train")) == sorted(
        ["good line", "still good", "bad \ufffd\ufffd here", "and \ufffd there"])


def test_split_is_deterministic_and_independent_of_seed_and_workers(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(random_lines(2000, seed=1, words=500)) + "\n")
    common = ["--heldout-fraction", 0.1, "--num-shards", 3, "--bucket-mb", 1]
    assert prepare(capsys, corpus, "-o", tmp_path / "a", "--workers", 1, *common)[0] == 0
    assert prepare(capsys, corpus, "-o", tmp_path / "b", "--workers", 2, *common)[0] == 0
    assert prepare(capsys, corpus, "-o", tmp_path / "c", "--workers", 1, "--seed", 7, *common)[0] == 0
    a, b, c = (tmp_path / "a", tmp_path / "b", tmp_path / "c")
    for name in ("train/shard-00000.txt", "train/shard-00002.txt", "heldout/shard-00000.txt", "vocab_counts.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()  # workers do not change anything
    assert Counter(shard_lines(a, "heldout")) == Counter(shard_lines(c, "heldout"))  # same split
    assert shard_lines(a, "train") != shard_lines(c, "train")  # another shuffle
    assert Counter(shard_lines(a, "train")) == Counter(shard_lines(c, "train"))
    sizes = json.loads((a / "manifest.json").read_text())["train"]["shard_sentences"]
    assert len(sizes) == 3 and max(sizes) - min(sizes) <= 1  # round-robin


def test_sentencepiece_on_chinese_end_to_end(tmp_path, capsys):
    rng = random.Random(0)
    words = ["我们", "喜欢", "学习", "中文", "今天", "天气", "很好", "北京", "大学", "朋友", "吃饭", "电脑"]
    lines = ["".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + "。" for _ in range(400)]
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    status, _, err = prepare(capsys, corpus, "-o", out, "--tokenizer", "sentencepiece", "--sp-vocab-size", 40,
                             "--heldout-fraction", 0.1, "--workers", 1)
    assert status == 0, err
    manifest = load_manifest(out / "manifest.json")
    assert manifest["tokenizer"]["type"] == "sentencepiece" and manifest["tokenizer"]["trained"]
    assert os.path.isfile(manifest["tokenizer"]["model"])
    train = shard_lines(out, "train")
    # tokens are pieces: joined again they give the sentence back
    assert Counter("".join(line.split()).replace("\u2581", "") for line in train + shard_lines(out, "heldout")) \
        == Counter(lines)
    assert sum(len(line.split()) for line in train) > len(train) * 2  # actually split into pieces
    assert manifest["vocab_size"] > 10
    dataset = LMDataset(out / "manifest.json", None, 4, 6, max_characters_per_token=50)
    batch = next(iter(dataset))
    assert batch["forward"]["mask"].all()
    assert (batch["forward"]["token_ids"] < manifest["vocab_size"]).all()
    assert (batch["forward"]["token_ids"] != 2).any()
    # a Chinese piece's char ids are its UTF-8 bytes (3 per character)
    assert (batch["forward"]["char_ids"][..., 1] > 0xE0).any()
    # the trained model can be reused: same tokens
    again = tmp_path / "again"
    assert prepare(capsys, corpus, "-o", again, "--tokenizer", "sentencepiece", "--sp-model",
                   manifest["tokenizer"]["model"], "--heldout-fraction", 0.1, "--workers", 1)[0] == 0
    assert Counter(shard_lines(again, "train")) == Counter(train)


def test_raw_text_split_at_whitespace_is_flagged_as_untokenized(tmp_path, capsys):
    raw = ["However, the river rose in the night.", "The river, they said, rose fast.",
           "It rose again the next night; nobody slept.", "In the U.S. the rain fell, and the river rose."] * 5
    tokenized = [" ".join(line.replace(",", " ,").replace(".", " .").replace(";", " ;").split()).replace("U .S .", "U.S.")
                 for line in raw]
    for name, lines in (("raw", raw), ("tokenized", tokenized)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, stdout, _ = prepare(capsys, tmp_path / "raw.txt", "-o", tmp_path / "raw", "--heldout-fraction", 0,
                                "--workers", 1)
    assert status == 0
    attached = json.loads((tmp_path / "raw" / "manifest.json").read_text())["attached_punctuation"]
    # "river," beside "river", "rose." beside "rose" (5 each of 155 tokens); "night.", "said," (no bare
    # "night", "said") and "U.S." (an abbreviation) are not counted
    assert attached["examples"] == ["river,", "rose."]
    assert attached["share"] == pytest.approx(10 / 155, abs=1e-6) and "the text looks untokenized" in stdout and "--tokenizer moses" in stdout
    status, stdout, _ = prepare(capsys, tmp_path / "tokenized.txt", "-o", tmp_path / "tok", "--heldout-fraction",
                                0, "--workers", 1)
    assert status == 0 and "untokenized" not in stdout
    assert json.loads((tmp_path / "tok" / "manifest.json").read_text())["attached_punctuation"]["share"] == 0
    pytest.importorskip("sacremoses")
    status, stdout, _ = prepare(capsys, tmp_path / "raw.txt", "-o", tmp_path / "moses", "--heldout-fraction", 0,
                                "--workers", 1, "--tokenizer", "moses")
    assert status == 0 and "untokenized" not in stdout
    assert json.loads((tmp_path / "moses" / "manifest.json").read_text())["attached_punctuation"] is None


def test_cleaning_dedup_long_lines_and_vocab_limits(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    text = ("a b\n" * 3 + "ｂ c\x07 d\n" + "\ufeffc\td\n" + "a a a a a a a\n" + "\x00\n" + "x" * 60 + "\n")
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    status, stdout, _ = prepare(capsys, corpus, "-o", out, "--nfkc", "--dedup", "--max-tokens-per-line", 3,
                                "--heldout-fraction", 0, "--min-count", 2, "--max-vocab", 5, "--workers", 1)
    assert status == 0
    lines = shard_lines(out, "train")
    # NFKC turned the full-width b into b; the bell, BOM and NUL went away; the tab separates
    assert Counter(lines) == Counter(["a b", "b c d", "c d", "a a a", "x" * 60, "a"])  # 2 x "a a a": one kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["duplicates_removed"] == 3
    assert manifest["long_tokens"]["types"] == 1 and "longer than 48 bytes" in stdout
    # counts after dedup: a 5, b 2, c 2, d 2; --min-count 2, --max-vocab 5 keeps a and b (b < c < d)
    assert (out / "vocab.txt").read_text().split("\n")[3:5] == ["a", "b"]
    assert manifest["vocab_size"] == 5
    assert manifest["train_oov_rate"] == pytest.approx(5 / 12)  # c, d and the long token, of 12


def test_output_directory_is_not_overwritten_without_force(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b\nc d\n")
    out = tmp_path / "out"
    assert prepare(capsys, corpus, "-o", out, "--workers", 1)[0] == 0
    (out / "notes.md").write_text("mine")
    status, _, err = prepare(capsys, corpus, "-o", out, "--workers", 1)
    assert status == 2 and "not empty" in err and "--force" in err
    corpus.write_text("e f\n")
    status, stdout, _ = prepare(capsys, corpus, "-o", out, "--workers", 1, "--force", "--heldout-fraction", 0)
    assert status == 0 and "replaced the previous outputs" in stdout
    assert (out / "notes.md").read_text() == "mine"
    assert shard_lines(out, "train") == ["e f"]


def test_missing_and_broken_inputs_are_named(tmp_path, capsys):
    status, _, err = prepare(capsys, tmp_path / "nope-*.txt", "-o", tmp_path / "out")
    assert status == 2 and "nope-*.txt" in err
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(b"this is not gzip data\n")
    status, _, err = prepare(capsys, broken, "-o", tmp_path / "out2", "--workers", 1)
    assert status == 2 and "broken.txt.gz" in err and "decompress" in err


def test_oversized_bucket_is_cut_into_parts(tmp_path):
    lines = [f"line {i % 700} x" for i in range(3000)]  # 2300 duplicates
    path = tmp_path / "bucket.txt"
    path.write_text("\n".join(lines) + "\n")
    result = shuffle_bucket(BucketTask(0, str(path), seed=3, dedup=True, count=True, max_bytes=4000))
    shuffled = open(result.path, encoding="utf-8").read().splitlines()
    assert sorted(shuffled) == sorted(set(lines)) and result.duplicates == 2300
    assert dict(zip(*result.counts))["x"] == 700
    assert not [p for p in os.listdir(tmp_path) if p != "bucket.txt.shuffled"]  # parts cleaned up
    path.write_text("\n".join(lines) + "\n")
    result = shuffle_bucket(BucketTask(0, str(path), seed=3, dedup=False, count=False, max_bytes=4000))
    shuffled = open(result.path, encoding="utf-8").read().splitlines()
    assert sorted(shuffled) == sorted(lines) and shuffled != lines and result.counts is None
