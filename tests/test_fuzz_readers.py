"""Every reader of a file a user hands bilm, fed truncated, random and mutated bytes (hypothesis).

Each case must end in the reader's result or in one line naming the file, of a type the command
line prints as one line (ValueError, OSError and their kin), within a time bound: never another
exception type (a traceback), a hang or a crash. Example counts are modest and derandomized, so
the file runs in seconds and the same cases every time."""
from __future__ import annotations

import json
import os
import signal
import time

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilm.runs.checkpoint import save_checkpoint
from bilm.runs.config import config_to_dict, load_config
from bilm.data.manifest import load_manifest
from bilm.data.shards import encode_shard
from bilm.inference.embedder import ElmoEmbedder, dump_token_embeddings
from bilm.core.errors import RunDirectoryLocked
from bilm.modules.language_model import LanguageModel
from bilm.core.options import BiLMOptions
from bilm.formats.weights import SOFTMAX_BIAS, SOFTMAX_WEIGHT
from bilm.modules.pretrained import load_pretrained
from bilm.runs.trained_model import model_from_checkpoint
from bilm.core.vocab import Vocabulary
from bilm.modules.weight_file import load_bilm, save_weights
from conftest import OPTIONS, WEIGHTS
from bilm.core.files import SP_MODEL_FILE, TOKENIZER_FILE
from bilm.core.text import TextPipeline
from train_helpers import TINY, TRAIN_DATA, TRAIN_VOCAB, tiny_config

# What bilm.cli.main prints as "bilm CMD: error: ..." without a traceback.
USER_ERRORS = (ValueError, OSError, RunDirectoryLocked)
SECONDS_PER_CASE = 10  # a hang is anything slower (SIGALRM interrupts it)
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def _variants(seed: bytes):
    """Truncated, random, or mutated (bytes overwritten, a span deleted, a span duplicated) ``seed``."""
    n = len(seed)
    truncated = st.integers(0, max(n - 1, 0)).map(lambda k: seed[:k])
    random_bytes = st.binary(max_size=512)

    def mutate(edits):
        data = bytearray(seed)
        for kind, position, value in edits:
            if not data:
                break
            i = position % len(data)
            if kind == 0:
                data[i] = value
            elif kind == 1:
                del data[i:i + value]
            else:
                data[i:i] = data[i:i + value]
        return bytes(data)

    edit = st.tuples(st.integers(0, 2), st.integers(0, max(n, 1) * 4), st.integers(0, 255))
    mutated = st.lists(edit, min_size=1, max_size=8).map(mutate)
    return st.one_of(truncated, random_bytes, mutated)


def _check(read, path: str, data: bytes, names: str | None = None) -> None:
    """Write ``data`` to ``path`` and read it: a result, or one line naming the file, in time."""
    with open(path, "wb") as f:
        f.write(data)

    def too_slow(signum, frame):
        raise TimeoutError(f"reading {path} took over {SECONDS_PER_CASE} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(SECONDS_PER_CASE)
    start = time.monotonic()
    try:
        read(path)
    except TimeoutError:
        raise
    except USER_ERRORS as e:
        message = str(e)
        assert "\n" not in message.strip(), f"{type(e).__name__} of more than one line: {message!r}"
        assert (names or path) in message, f"{type(e).__name__} does not name the file: {message!r}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < SECONDS_PER_CASE


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """One valid file of each kind, the starting point of the mutations."""
    d = tmp_path_factory.mktemp("seeds")
    cfg = tiny_config("model.lstm.dim=8", "model.lstm.projection_dim=4")
    vocab = Vocabulary.from_file(TRAIN_VOCAB)
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, len(vocab), sparse_softmax=False)
    save_checkpoint({"step": 1, "config": config_to_dict(cfg), "model": model.state_dict(), "optimizer": None,
                     "vocab": vocab.tokens, "text_pipeline": TextPipeline().to_state()}, str(d / "step-00000001.pt"))
    with h5py.File(d / "softmax.hdf5", "w") as f:
        f.create_dataset(SOFTMAX_WEIGHT, data=np.zeros((len(vocab), 4), np.float32))
        f.create_dataset(SOFTMAX_BIAS, data=np.zeros(len(vocab), np.float32))
    manifest = {"format": "bilm-data", "format_version": 1, "vocab": "vocab.txt",
                "train": {"shards": ["train/shard-00000.txt"]}, "heldout": {"shards": []},
                "tokenizer": {"type": "whitespace"}, "normalization": {"nfkc": False}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    import sentencepiece
    sentencepiece.SentencePieceTrainer.train(input=TRAIN_DATA, model_prefix=str(d / "sp"), vocab_size=40,
                                             normalization_rule_name="identity", minloglevel=3)
    TextPipeline("sentencepiece", sp_model_proto=_read_bytes(str(d / "sp.model"))).save(str(d))
    dump_token_embeddings(TRAIN_VOCAB, OPTIONS, WEIGHTS, str(d / "tokens.hdf5"), progress=False)
    return _Seeds({"checkpoint": _read_bytes(str(d / "step-00000001.pt")),
                   "softmax": _read_bytes(str(d / "softmax.hdf5")),
                   "token_embeddings": _read_bytes(str(d / "tokens.hdf5")),
            "manifest": _read_bytes(str(d / "manifest.json")), "tokenizer": _read_bytes(str(d / TOKENIZER_FILE)),
            "sp_model": _read_bytes(str(d / SP_MODEL_FILE)), "options": _read_bytes(OPTIONS),
            "weights": _read_bytes(WEIGHTS), "vocab": _read_bytes(TRAIN_VOCAB), "shard": _read_bytes(TRAIN_DATA),
            "config": _read_bytes(TINY), "cfg": cfg, "vocab_tokens": vocab.tokens, "csv": CSV_SEED})


class _Seeds(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case: not the seed bytes
        return "seeds"


def _softmax_reader(seeds, tmp_path):
    model = LanguageModel(seeds["cfg"].model, len(seeds["vocab_tokens"]), sparse_softmax=False)
    weights = str(tmp_path / "weights.hdf5")
    save_weights(model.bilm, weights)
    return lambda path: load_pretrained(model, weights, softmax_file=path)


def _manifest_reader(seeds, tmp_path):
    def read(path):
        TextPipeline.from_manifest(load_manifest(path))  # what train reads of it besides the shard lists
    return read


def _tokenizer_reader(seeds, tmp_path):
    (tmp_path / SP_MODEL_FILE).write_bytes(seeds["sp_model"])
    return lambda path: TextPipeline.load(os.path.dirname(path))


def _sp_model_reader(seeds, tmp_path):
    (tmp_path / TOKENIZER_FILE).write_bytes(seeds["tokenizer"])
    return lambda path: TextPipeline.load(os.path.dirname(path)).tokenize("the cat sat on the mat")


# A CSV corpus as bilm prepare reads it: quoted delimiters, quotes and newlines, a blank line, non-ASCII.
CSV_SEED = ('id,text,label\r\n1,"Hello, world. ""Quoted"".",a\r\n2,"two\nlines",b\r\n\r\n3,007,c\r\n'
            '4,naïve café 日本,d\r\n5,,e\r\n').encode("utf-8")


def _csv_reader(seeds, tmp_path):
    """bilm prepare's CSV reader (pyarrow's), skipping bad rows and stopping at the first."""
    pytest.importorskip("pyarrow")
    from data_tools.inputs import detect_format
    from data_tools.tables import BadRecords, read_csv

    def read(path):
        for skip_bad in (True, False):
            list(read_csv(detect_format(path), "text", skip_bad, BadRecords()))
    return read


# seed -> (the file's name, a reader of such a file given the seeds and a directory)
READERS = {
    "options": ("options.json", lambda seeds, tmp_path: BiLMOptions.from_file),
    "weights": ("weights.hdf5", lambda seeds, tmp_path: lambda path: load_bilm(OPTIONS, path)),
    "softmax": ("softmax.hdf5", _softmax_reader),
    "vocab": ("vocab.txt", lambda seeds, tmp_path: Vocabulary.from_file),
    "manifest": ("manifest.json", _manifest_reader),
    "tokenizer": (TOKENIZER_FILE, _tokenizer_reader),
    "sp_model": (SP_MODEL_FILE, _sp_model_reader),
    "shard": ("shard-00000.txt",
              lambda seeds, tmp_path: lambda path: encode_shard(path, Vocabulary(seeds["vocab_tokens"]))),
    "token_embeddings": ("tokens.hdf5", lambda seeds, tmp_path: lambda path: ElmoEmbedder(
        OPTIONS, WEIGHTS, token_embedding_file=path, vocab_file=TRAIN_VOCAB)),
    "config": ("config.yaml", lambda seeds, tmp_path: load_config),
    "checkpoint": ("step-00000001.pt", lambda seeds, tmp_path: model_from_checkpoint),  # what evaluate and export read
    "csv": ("corpus.csv", _csv_reader),
}


@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(data=st.data())
def test_reader(seeds, tmp_path, kind, data):
    """The seeds come from a module fixture, so the bytes are drawn inside the test (st.data())."""
    name, make_reader = READERS[kind]
    case = tmp_path / kind
    case.mkdir(exist_ok=True)
    _check(make_reader(seeds, case), str(case / name), data.draw(_variants(seeds[kind])))


# ----- a damaged or missing shard met during training -----

def test_a_damaged_or_missing_shard_stops_training_with_one_line_and_the_checkpoints_intact(tmp_path, capsys):
    from bilm.runs.checkpoint import load_checkpoint
    from bilm.runs.run_dir import list_checkpoints
    from bilm.cli import main as bilm_main
    from test_faults import _train_args

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.txt", "b.txt"):
        (data / name).write_bytes(_read_bytes(TRAIN_DATA))
    (data / "vocab.txt").write_bytes(_read_bytes(TRAIN_VOCAB))
    manifest = {"format": "bilm-data", "format_version": 1, "vocab": "vocab.txt",
                "train": {"shards": ["a.txt", "b.txt"]}, "heldout": {"shards": []}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"

    def train_args(steps):
        argv = _train_args(run, f"train.max_steps={steps}", "train.checkpoint_every_steps=1",
                           "train.keep_checkpoints=1000", fast=False)  # > max_steps: none pruned
        i = argv.index("--vocab")
        del argv[i:i + 2]  # the manifest names it
        argv[argv.index("--data") + 1] = str(data / "manifest.json")
        return argv

    assert bilm_main(train_args(2)) == 0
    capsys.readouterr()
    damaged = data / "b.txt"
    text = _read_bytes(str(damaged))
    damaged.write_bytes(text[:300] + b"\xff\xfe\x00\x00" + text[300:])  # bytes no prepare writes
    for fault in ("damaged", "missing"):
        if fault == "missing":
            damaged.unlink()
        before = {p: _read_bytes(p) for p in list_checkpoints(str(run / "checkpoints"))}
        assert bilm_main(train_args(500) + ["--resume"]) == 1, fault
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and str(damaged) in err, err
        after = list_checkpoints(str(run / "checkpoints"))
        assert all(_read_bytes(p) == before[p] for p in before)  # nothing already written lost
        load_checkpoint(after[-1])  # the newest one loads
    assert len(after) > 2  # the damaged shard was met during training, after further checkpoints
