"""The biLM being probed and its vectors for a file: one embedding pass per model and file, cached.

The model comes from files (``options.json`` + ``weights.hdf5``: a name, a directory or the two
paths), from a run's checkpoint, or is the random control: a biLM of the same options with the
weights a training run starts from (``torch.manual_seed(train.seed)``, then the module built, as
``bilm train`` does). Every sentence starts from zero LSTM states, so a sentence's vectors do not
depend on the others in the file or on their order.

The vectors of a file are every token's layers (n_tokens, n_layers, 2 * projection_dim), kept as
float16 (half the memory and disk; the heads read them as float32). They are cached under a key
made of everything they depend on: the model's identity (the sha256 of its weight or checkpoint
file and of its options; for the random control, the options, the seed and the sha256 of the
weights built), the labelled file's sha256, the tokenizer, the precision and how tokens were read. The key is also stored inside the
cache file and compared on reading, so a cache file can only serve the vectors it was made for; a
file cut short, damaged or with arrays of other shapes is embedded again and rewritten.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from bilm.core.atomic import atomic_path
from bilm.core.chars import CharIdMapper
from bilm.core.digest import sha256_file
from bilm.core.errors import InputError
from bilm.core.precision import autocast, check_precision
from bilm.core.progress import progress_bar
from bilm.core.text import TextPipeline
from bilm.evaluation.probe_data import LabelledData
from bilm.modules.bidirectional import BidirectionalLM

CACHE_FORMAT = 1
PIECE_POOLING = "mean"  # a file token split into several pieces gets the mean of their vectors


def default_cache_dir() -> str:
    """``$BILM_CACHE/probe`` (``~/.cache/bilm/probe``), beside the published models."""
    from bilm.modules.published import cache_dir
    return os.path.join(cache_dir(), "probe")


@dataclass
class ProbedModel:
    """A frozen biLM, its text pipeline (None: whitespace split) and what identifies its weights."""
    bilm: BidirectionalLM
    pipeline: Optional[TextPipeline]
    identity: dict
    description: str
    random_seed: int = 0  # the seed of the random control built from it (a run's train.seed)
    told_whitespace: bool = False

    @property
    def n_layers(self) -> int:
        return self.bilm.n_layers


def _checked(bilm: BidirectionalLM, source: str) -> BidirectionalLM:
    if bilm.options.char_cnn is None:
        raise InputError(f"{source}: a word-input biLM (no char_cnn in its options) reads token ids of its own "
                         "vocabulary; bilm probe reads characters")
    return bilm.eval()


def model_from_files(options_file: str, weight_file: str) -> ProbedModel:
    """``options.json`` + ``weights.hdf5`` (files that disagree: an error naming the dataset and the file)."""
    from bilm.modules.weight_file import load_bilm
    bilm = _checked(load_bilm(options_file, weight_file), options_file)
    pipeline = TextPipeline.load(os.path.dirname(os.path.abspath(options_file)))
    identity = {"weights_sha256": sha256_file(weight_file), "options_sha256": sha256_file(options_file)}
    return ProbedModel(bilm, pipeline, identity, weight_file)


def model_from_checkpoint(path: str, best: bool = False) -> ProbedModel:
    """The biLM of a run's checkpoint (a file, or a run directory: its newest, or ``best.pt``)."""
    from bilm.runs.trained_model import model_from_checkpoint as trained_model
    trained = trained_model(path, best=best)
    bilm = _checked(trained.model.bilm, trained.path)
    identity = {"checkpoint_sha256": sha256_file(trained.path)}
    return ProbedModel(bilm, trained.text_pipeline, identity, trained.path, random_seed=trained.config.train.seed)


def weights_sha256(module: torch.nn.Module) -> str:
    """The sha256 of a module's state (names and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def random_control(model: ProbedModel) -> ProbedModel:
    """A biLM of ``model``'s options with the weights a training run with its seed starts from."""
    options = copy.deepcopy(model.bilm.options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.random_seed)  # as bilm train: seed_everything(train.seed), then the modules
        bilm = BidirectionalLM(options)
    # The weights themselves, not only the seed: another torch or another bilm may build other
    # initial weights from the same seed, and must not be served the vectors of these.
    identity = {"random_init_seed": model.random_seed, "options": options.to_dict(),
                "weights_sha256": weights_sha256(bilm)}
    return ProbedModel(bilm.eval(), model.pipeline, identity, f"random weights (seed {model.random_seed})",
                       model.random_seed, told_whitespace=True)


# ----------------------------------------------------------------------------- tokens

@dataclass
class ModelInputs:
    """What the biLM reads for each sentence (``pieces``), and for tagging which file token each
    piece belongs to (``groups``: piece -> token index); ``n_split``: file tokens cut into pieces."""
    pieces: list[list[str]]
    groups: Optional[list[list[int]]]
    n_split: int = 0


def tokenizer_description(pipeline: Optional[TextPipeline], pretokenized: bool) -> dict:
    if pretokenized or pipeline is None:
        return {"tokenizer": "whitespace split"}
    state = dict(pipeline.describe())
    if pipeline.sp_model_proto:
        state["sentencepiece_sha256"] = hashlib.sha256(pipeline.sp_model_proto).hexdigest()
    return state


def model_inputs(data: LabelledData, pipeline: Optional[TextPipeline], pretokenized: bool) -> ModelInputs:
    """Classification: each text tokenized with the model's pipeline (whitespace split with
    ``pretokenized`` or without a pipeline). Tagging: the file's tokens, each one run through the
    pipeline on its own (a SentencePiece model may cut it into pieces); a token the pipeline
    cleans away entirely is read as it is."""
    use_pipeline = pipeline is not None and not pretokenized
    if data.task == "classify":
        tokenized = pipeline.tokenize_lines(data.texts) if use_pipeline else [t.split() for t in data.texts]
        # A text the pipeline cleans to nothing (control characters only) is read as written.
        return ModelInputs([toks or text.split() for toks, text in zip(tokenized, data.texts)], None)
    if not use_pipeline:
        return ModelInputs([list(s) for s in data.tokens], [list(range(len(s))) for s in data.tokens])
    distinct = sorted({t for s in data.tokens for t in s})
    pieces_of = dict(zip(distinct, pipeline.tokenize_lines(distinct)))
    pieces, groups, n_split = [], [], 0
    for sentence in data.tokens:
        row, group = [], []
        for i, token in enumerate(sentence):
            parts = pieces_of[token] or [token]
            n_split += len(parts) > 1
            row += parts
            group += [i] * len(parts)
        pieces.append(row)
        groups.append(group)
    return ModelInputs(pieces, groups, n_split)


# ----------------------------------------------------------------------------- vectors

@dataclass
class Vectors:
    """Every token's layers of one file, sentence after sentence: sentence i is rows
    ``offsets[i]:offsets[i + 1]`` of ``layers`` (n_tokens, n_layers, dim), float16."""
    layers: np.ndarray
    offsets: np.ndarray
    n_split: int = 0        # tagging: file tokens whose vector is the mean of several pieces
    from_cache: bool = False

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@torch.no_grad()
def embed(model: ProbedModel, inputs: ModelInputs, precision: str = "fp32", device: str = "cpu",
          batch_size: int = 64, progress: bool = True, desc: str = "embed") -> Vectors:
    """One pass of the frozen biLM over every sentence (zero states each), longest first in
    batches of ``batch_size`` sentences; for tagging, pieces pooled back to the file's tokens."""
    check_precision(precision)
    device = torch.device(device)
    bilm = model.bilm.to(device)
    mapper = CharIdMapper(bilm.options.char_cnn.max_characters_per_token)
    n_sentences = len(inputs.pieces)
    token_counts = [len(g) and max(g) + 1 for g in inputs.groups] if inputs.groups else \
        [len(p) for p in inputs.pieces]
    offsets = np.zeros(n_sentences + 1, dtype=np.int64)
    np.cumsum(token_counts, out=offsets[1:])
    out = np.zeros((int(offsets[-1]), bilm.n_layers, bilm.options.output_dim), dtype=np.float16)
    order = sorted(range(n_sentences), key=lambda i: -len(inputs.pieces[i]))
    bar = progress_bar(total=int(sum(len(p) for p in inputs.pieces)), unit="tok", desc=desc, disable=not progress)
    with bar:
        for start in range(0, n_sentences, batch_size):
            batch = order[start:start + batch_size]
            sentences = [inputs.pieces[i] for i in batch]
            rows = mapper.batch_rows(sentences)
            char_ids = torch.from_numpy(mapper.table[rows]).to(device)
            mask = torch.from_numpy(rows > 0).to(device)
            with autocast(device, precision):
                layers, _ = bilm(char_ids, mask)
            stacked = torch.stack(layers, dim=2).float().cpu().numpy()  # (B, T + 2, L, D)
            for k, i in enumerate(batch):
                vectors = stacked[k, 1:len(sentences[k]) + 1]  # without <S> and </S>
                if inputs.groups is not None and len(vectors) != token_counts[i]:
                    group = np.asarray(inputs.groups[i])
                    sums = np.zeros((token_counts[i], *vectors.shape[1:]), dtype=np.float32)
                    np.add.at(sums, group, vectors)
                    vectors = sums / np.bincount(group, minlength=token_counts[i])[:, None, None]
                out[offsets[i]:offsets[i + 1]] = vectors
            bar.update(sum(len(s) for s in sentences))
    return Vectors(out, offsets, inputs.n_split)


def cache_key(model: ProbedModel, data: LabelledData, pretokenized: bool, precision: str) -> dict:
    """Everything the vectors of ``data`` depend on."""
    lines = hashlib.sha256(np.asarray(data.lines, dtype=np.int64).tobytes()).hexdigest()
    return {"format": CACHE_FORMAT, "model": model.identity, "file_sha256": sha256_file(data.path),
            "reader": data.reader, "lines_sha256": lines, "tokens": tokenizer_description(model.pipeline, pretokenized),
            "piece_pooling": PIECE_POOLING, "precision": precision, "n_layers": model.n_layers}


def cache_path(cache_dir: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir, f"{digest[:40]}.npz")


def read_cache(path: str, key: dict, n_sentences: int, dim: int) -> Optional[Vectors]:
    """The cached vectors at ``path`` if it holds exactly ``key``'s, whole: ``n_sentences``
    sentences of at least one token, each token (n_layers, ``dim``) float16. Else None (embed again):
    no file, one cut short or damaged (zip's CRC), another kind of file, arrays that disagree.
    Members must be stored uncompressed (as ``write_cache`` writes them), so what is read is bounded
    by the file's own size."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if any(info.compress_type != zipfile.ZIP_STORED for info in f.zip.infolist()):
                return None
            if json.loads(str(f["key"])) != json.loads(json.dumps(key)):
                return None
            layers, offsets, n_split = f["layers"], f["offsets"], f["n_split"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, MemoryError, TypeError, AttributeError):
        # MemoryError: a header claiming more than memory (a smaller claim ends at the member's end: EOF);
        # TypeError (AttributeError before Python 3.11): a .npy file, an array has no `with`.
        return None
    whole = (layers.dtype == np.float16 and layers.shape[1:] == (key["n_layers"], dim)
             and offsets.dtype.kind == "i" and offsets.shape == (n_sentences + 1,)
             and offsets[0] == 0 and offsets[-1] == len(layers) and bool((np.diff(offsets) > 0).all())
             and n_split.shape == () and n_split.dtype.kind == "i")
    return Vectors(layers, offsets.astype(np.int64), int(n_split), from_cache=True) if whole else None


def write_cache(path: str, key: dict, vectors: Vectors) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), layers=vectors.layers,
                     offsets=vectors.offsets, n_split=np.array(vectors.n_split))


def file_vectors(model: ProbedModel, data: LabelledData, cache_dir: Optional[str], pretokenized: bool = False,
                 precision: str = "fp32", device: str = "cpu", batch_size: int = 64, progress: bool = True,
                 desc: str = "embed") -> Vectors:
    """The vectors of every sentence of ``data`` (the file's sentences it holds: all of them, or a
    subsample), from the cache when it holds them; ``cache_dir`` None: no cache."""
    key = path = None
    if cache_dir:
        key = cache_key(model, data, pretokenized, precision)
        path = cache_path(cache_dir, key)
        cached = read_cache(path, key, len(data), model.bilm.options.output_dim)
        if cached is not None:
            return cached
    inputs = model_inputs(data, model.pipeline, pretokenized)
    if model.pipeline is None and not pretokenized and data.task == "classify" and not model.told_whitespace:
        model.told_whitespace = True
        print("note: this model has no tokenizer (a published model, or one exported before bilm recorded "
              "tokenizers): text is split on whitespace", file=sys.stderr)
    vectors = embed(model, inputs, precision, device, batch_size, progress, desc)
    if path is not None:
        try:
            write_cache(path, key, vectors)
        except OSError as e:  # a full or read-only cache costs a second pass next time, not this result
            print(f"warning: cannot write the vector cache {path} ({e.strerror or e})", file=sys.stderr)
    return vectors
