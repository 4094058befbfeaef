"""The tokenizer travels with the model: prepare -> train -> export -> embed / evaluate on raw text.

Raw text must become exactly the tokens ``bilm prepare`` made of it (tokenizer and normalization),
at every stage after training: the checkpoint holds the pipeline, ``bilm export`` writes it
(``tokenizer.json`` + ``sentencepiece.model``), embed and evaluate apply it.
"""
from __future__ import annotations

import json
import os
import shutil
import re

import h5py
import pytest

from bilm import ElmoEmbedder
from bilm.cli import main as bilm_main
from bilm.core.errors import InputError
from bilm.data import load_manifest
from bilm.scoring.evaluate import evaluate
from bilm.commands.export import export
from bilm.runs.trained_model import model_from_checkpoint
from bilm.training.run import train
from conftest import OPTIONS, WEIGHTS
from bilm.core.text import TextPipeline
from data_tools.prepare import main as prepare_main
from train_helpers import ROOT, tiny_config

ZH = os.path.join(ROOT, "data", "sample_zh", "zh.txt")
EN = os.path.join(ROOT, "data", "sample", "heldout.txt")
# Lines NFKC changes: full-width letters and digits, a ligature, a full-width comma.
NFKC_LINES = ["ｆｕｌｌ ｗｉｄｔｈ text ， with ﬁve ２０２６ forms", "the ﬁrst ｂａｎｋ of the river"]


def _prepare(tmp_path, name, inputs, *flags):
    out = tmp_path / name
    assert prepare_main([*map(str, inputs), "--out", str(out), "--heldout-fraction", "0.2", "--seed", "1",
                         "--no-progress", *flags]) == 0
    return out


def _train(out, run):
    cfg = tiny_config("train.max_steps=4", "train.checkpoint_every_steps=4")
    train(cfg, str(out / "manifest.json"), str(run), progress=False)
    return str(run)


def _shard_lines(out, split):
    lines = []
    for path in load_manifest(str(out / "manifest.json"))[split]["shards"]:
        with open(path, encoding="utf-8") as f:
            lines += f.read().splitlines()
    return lines


def _raw_in_shard_order(raw_lines, out, pipeline):
    """The raw lines of the heldout split, in the order prepare wrote them."""
    by_tokens = {}
    for line in raw_lines:
        tokens = pipeline.tokenize(line)
        if tokens:
            by_tokens.setdefault(" ".join(tokens), line)
    return [by_tokens[line] for line in _shard_lines(out, "heldout")]


CASES = {"whitespace": [], "whitespace-nfkc": ["--nfkc"],
         "sentencepiece": ["--tokenizer", "sentencepiece", "--sp-vocab-size", "1500"],
         "sentencepiece-nfkc": ["--tokenizer", "sentencepiece", "--sp-vocab-size", "1500", "--nfkc"]}


@pytest.mark.parametrize("case", list(CASES))
def test_raw_heldout_evaluates_as_the_manifest(tmp_path, case):
    raw_path = tmp_path / "raw.txt"
    source = ZH if case.startswith("sentencepiece") else EN
    with open(source, encoding="utf-8") as f:
        raw_lines = f.read().splitlines()[:120] + NFKC_LINES
    raw_path.write_text("\n".join(raw_lines) + "\n", encoding="utf-8")
    out = _prepare(tmp_path, "data", [raw_path], *CASES[case])
    run = _train(out, tmp_path / "run")
    pipeline = model_from_checkpoint(run).text_pipeline
    assert pipeline.tokenizer == ("sentencepiece" if "sentencepiece" in case else "whitespace")
    assert pipeline.nfkc == case.endswith("nfkc")
    # Every prepared line is the pipeline's tokenization of a raw line.
    tokenized = {" ".join(pipeline.tokenize(line)) for line in raw_lines}
    assert set(_shard_lines(out, "train")) | set(_shard_lines(out, "heldout")) <= tokenized

    heldout_raw = tmp_path / "heldout_raw.txt"
    heldout_raw.write_text("\n".join(_raw_in_shard_order(raw_lines, out, pipeline)) + "\n", encoding="utf-8")
    from_manifest = evaluate(run, str(out / "manifest.json"), progress=False, device="cpu")
    from_raw = evaluate(run, str(heldout_raw), progress=False, device="cpu")
    for d in ("forward", "backward"):
        assert from_raw[d]["tokens"] == from_manifest[d]["tokens"] > 0
        assert from_raw[d]["perplexity"] == pytest.approx(from_manifest[d]["perplexity"], rel=1e-9)
    if case == "whitespace":  # an empty file among them is skipped and named; empty files alone are an error
        (tmp_path / "mix").mkdir()
        (tmp_path / "mix" / "a.txt").write_text(heldout_raw.read_text(encoding="utf-8"), encoding="utf-8")
        (tmp_path / "mix" / "b.txt").write_text("\n \n", encoding="utf-8")
        with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'mix' / 'b.txt'}: no tokens (empty, or blank "
                                                       "lines only); skipped")):
            with_empty = evaluate(run, str(tmp_path / "mix" / "*.txt"), progress=False, device="cpu")
        assert with_empty["forward"]["tokens"] == from_raw["forward"]["tokens"]
        with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'mix' / 'b.txt'}: no tokens to evaluate")):
            evaluate(run, str(tmp_path / "mix" / "b.txt"), progress=False, device="cpu")
    if case.endswith("nfkc"):  # lines NFKC changes read differently without the pipeline
        nfkc_raw = tmp_path / "nfkc.txt"
        nfkc_raw.write_text("\n".join(NFKC_LINES) + "\n", encoding="utf-8")
        normalized = evaluate(run, str(nfkc_raw), progress=False, device="cpu")
        as_given = evaluate(run, str(nfkc_raw), progress=False, device="cpu", pretokenized=True)
        assert as_given["forward"]["perplexity"] != pytest.approx(normalized["forward"]["perplexity"], rel=1e-3)


@pytest.fixture(scope="module")
def chinese_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zh")
    out = _prepare(tmp, "data", [ZH], *CASES["sentencepiece-nfkc"])
    run = _train(out, tmp / "run")
    result = export(run, str(tmp / "export"))
    return out, tmp / "export", result


def test_chinese_end_to_end_raw_text_gets_the_training_pieces(chinese_export, tmp_path):
    out, exported, result = chinese_export
    assert {"tokenizer.json", "sentencepiece.model"} <= set(result["files"])
    with open(exported / "options.json") as f:
        assert set(json.load(f)) == {"lstm", "char_cnn"}  # the published format, nothing added
    # Copied elsewhere, with nothing else alongside.
    moved = tmp_path / "elsewhere"
    shutil.copytree(exported, moved)
    embedder = ElmoEmbedder(str(moved / "options.json"), str(moved / "weights.hdf5"), stateful=False)
    with open(ZH, encoding="utf-8") as f:
        raw = f.read().splitlines()[:6]
    prepared = set(_shard_lines(out, "train")) | set(_shard_lines(out, "heldout"))
    for line, (tokens, vectors) in zip(raw, embedder.embed_texts(raw)):
        assert len(tokens) > 3 and " ".join(tokens) in prepared, (line, tokens)
        assert vectors.shape == (3, len(tokens), embedder.model.options.output_dim)
    assert embedder.embed_text(raw[0])[0] == embedder.tokenize_lines([raw[0]])[0]

    # The CLI: one vector per piece, the pieces stored with each line.
    text = tmp_path / "zh_raw.txt"
    text.write_text("我们今天去银行存钱。\n" + "\n".join(raw[:2]) + "\n", encoding="utf-8")
    h5 = tmp_path / "zh.hdf5"
    assert bilm_main(["embed", "--options", str(moved / "options.json"), "--weights", str(moved / "weights.hdf5"),
                      "--input", str(text), "--out", str(h5)]) == 0
    pipeline = TextPipeline.load(str(moved))
    with h5py.File(h5, "r") as f:
        for i, line in enumerate(text.read_text(encoding="utf-8").splitlines()):
            tokens = json.loads(f[str(i)].attrs["tokens"])
            assert tokens == pipeline.tokenize(line)
            assert f[str(i)].shape == (3, len(tokens), embedder.model.options.output_dim)
        assert len(json.loads(f["0"].attrs["tokens"])) > 1  # not one "token" for the whole sentence
    # --pretokenized: today's whitespace split (one token for the unsegmented sentence).
    assert bilm_main(["embed", "--options", str(moved / "options.json"), "--weights", str(moved / "weights.hdf5"),
                      "--input", str(text), "--out", str(h5), "--pretokenized", "--force"]) == 0
    with h5py.File(h5, "r") as f:
        assert json.loads(f["0"].attrs["tokens"]) == ["我们今天去银行存钱。"]


def test_embed_refuses_to_overwrite_without_force(chinese_export, tmp_path, capsys):
    _, exported, _ = chinese_export
    text = tmp_path / "t.txt"
    text.write_text("天气很好。\n", encoding="utf-8")
    target = tmp_path / "o.hdf5"
    target.write_bytes(b"keep me")
    args = ["embed", "--options", str(exported / "options.json"), "--weights", str(exported / "weights.hdf5"),
            "--input", str(text), "--out", str(target)]
    assert bilm_main(args) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"


def test_models_without_tokenizer_split_on_whitespace_and_say_so_once(tmp_path, capsys):
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False)  # bilm-tf's fixture: no tokenizer.json
    assert embedder.text_pipeline is None
    tokens, vectors = embedder.embed_text("the  bank\tof the river")
    assert tokens == ["the", "bank", "of", "the", "river"] and vectors.shape[1] == 5
    embedder.embed_text("again")
    assert capsys.readouterr().err.count("split on whitespace") == 1


def test_whitespace_model_warns_on_unsegmented_text(tmp_path):
    text = tmp_path / "mixed.txt"
    text.write_text("a normal line\n我们今天去银行存钱。\n" + "x" * 60 + "\n", encoding="utf-8")
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False)
    with pytest.warns(UserWarning, match=r"mixed.txt, line 2: token '我们今天去银行存钱。' is a run of CJK characters"
                                         r".*\(2 such lines\).*--tokenizer sentencepiece"):
        embedder.embed_file(str(text), str(tmp_path / "out.hdf5"), progress=False)


def test_training_from_shard_glob_records_no_pipeline(tmp_path):
    from train_helpers import TRAIN_DATA, TRAIN_VOCAB

    run = tmp_path / "run"
    train(tiny_config("train.max_steps=2"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    assert model_from_checkpoint(str(run)).text_pipeline is None
    result = export(str(run), str(tmp_path / "export"))
    assert "tokenizer.json" not in result["files"] and not (tmp_path / "export" / "tokenizer.json").exists()


def test_reexport_without_pipeline_removes_a_stale_tokenizer(chinese_export, tmp_path):
    from train_helpers import TRAIN_DATA, TRAIN_VOCAB

    _, exported, _ = chinese_export
    target = tmp_path / "export"
    shutil.copytree(exported, target)
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=2"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    with pytest.raises(FileExistsError, match="tokenizer.json"):
        export(str(run), str(target))
    export(str(run), str(target), force=True)
    assert not (target / "tokenizer.json").exists() and not (target / "sentencepiece.model").exists()


def test_tokenizer_file_errors_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"format": "bilm-tokenizer", "tokenizer": "sentencepiece"}')
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json names the SentencePiece model .*sentencepiece.model"):
        TextPipeline.load(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: not valid JSON"):
        TextPipeline.load(str(tmp_path))
