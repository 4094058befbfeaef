"""ElmoEmbedder: ELMo vectors for sentences from ``options.json`` + ``weights.hdf5``.

Token lists in (``embed_sentence``, ``embed_batch``: AllenNLP's API), or raw text
(``embed_text``, ``embed_texts``, ``embed_file``): raw text is tokenized with the model's
own pipeline, ``tokenizer.json`` (+ ``sentencepiece.model``) beside ``options.json`` as
``bilm export`` writes them; published models have none and are split on whitespace.

Stateful by default, like bilm-tf's inference graph: batch row k carries its LSTM states
into row k of the next call, so vectors depend on what was embedded before (the original
warms up this way). ``stateful=False`` starts every batch from zero states: the same
sentence always gets the same vectors. ``runtime="onnx"`` runs that stateless model with
onnxruntime instead of PyTorch (``bilm.inference.onnx_runtime``).
"""
from __future__ import annotations

import json
import os
import sys
from itertools import islice
from typing import Iterable, Iterator, Optional, Sequence, Union

import h5py
import numpy as np
import torch

from bilm.core.atomic import atomic_path
from bilm.core.chars import CharIdMapper, char_id_table
from bilm.core.errors import InputError, not_utf8
from bilm.core.finite import non_finite_weights
from bilm.modules.bidirectional import BidirectionalLM, RowStates
from bilm.core.precision import autocast, check_precision
from bilm.core.progress import progress_bar
from bilm.modules.published import model_files
from bilm.core.vocab import read_tokens
from bilm.formats.weights import WeightFileError, reading
from bilm.modules.weight_file import load_bilm
from bilm.core.text import TextPipeline, warn_suspicious_lines

OUTPUT_FORMATS = ("all", "top", "average")
RUNTIMES = ("torch", "onnx")
OUTPUT_DTYPES = ("float32", "float16")


class ElmoEmbedder:
    def __init__(self, options_file: Optional[str] = None, weight_file: Optional[str] = None,
                 device: Union[str, int] = "cpu", batch_size: int = 64,
                 stateful: Optional[bool] = None, token_embedding_file: Optional[str] = None,
                 vocab_file: Optional[str] = None, lstm_impl: str = "fused",
                 text_pipeline: Union[TextPipeline, None, str] = "auto", cuda_device: Optional[int] = None,
                 precision: str = "fp32", runtime: str = "torch"):
        """AllenNLP's ``ElmoEmbedder``: ``ElmoEmbedder()`` is the published ``original`` model
        (downloaded once to the cache), ``ElmoEmbedder("small")`` another published one or a
        directory holding ``options.json`` + ``weights.hdf5``, ``ElmoEmbedder(options, weights)``
        your files (paths or URLs). ``device``: "cpu", "cuda:0", ... or AllenNLP's ``cuda_device``
        (-1 is the CPU). Stateful by default in PyTorch, as the original (``stateful=None``).

        ``text_pipeline``: how ``embed_text`` / ``embed_file`` tokenize raw text. "auto" reads
        ``tokenizer.json`` beside the options (written by ``bilm export``); None, or no such
        file, splits on whitespace.

        ``precision``: "fp32", or "bf16" (autocast: matrix multiplies in bfloat16, the LSTM cell
        state in fp32; vectors are returned as float32 either way).

        ``runtime``: "torch", or "onnx": the stateless ONNX model (``bilm.inference.onnx_runtime``) run by
        onnxruntime on the CPU, from ``model.onnx`` in the model's directory when present, else
        built once into the cache. It is stateless only (``stateful=True`` is refused), fp32, and
        reads char ids (no ``token_embedding_file``); tokenizer and outputs are the same."""
        self.precision = check_precision(precision)
        if runtime not in RUNTIMES:
            raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.runtime = runtime
        self._onnx = None
        if runtime == "onnx":
            from bilm.inference.onnx_runtime import check_onnx_arguments, serving_files
            check_onnx_arguments(stateful, precision, token_embedding_file, device if cuda_device is None
                                 else cuda_device)
            options_file, weight_file = serving_files(options_file, weight_file)
        else:
            options_file, weight_file = model_files(options_file, weight_file)
        if cuda_device is not None:
            device = cuda_device
        if isinstance(device, int):
            device = "cpu" if device < 0 else f"cuda:{device}"
        self.text_pipeline: Optional[TextPipeline] = (
            TextPipeline.load(os.path.dirname(os.path.abspath(options_file))) if text_pipeline == "auto"
            else text_pipeline)
        self._told_whitespace = False
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.stateful = (runtime == "torch") if stateful is None else stateful  # default: stateful in PyTorch
        if runtime == "onnx":
            from bilm.inference.onnx_export import write_onnx
            from bilm.inference.onnx_runtime import load_onnx_bilm
            # As many threads as PyTorch would use (OMP_NUM_THREADS, torch.set_num_threads): onnxruntime's own
            # default counts the machine's cores and ignores both.
            self._onnx = load_onnx_bilm(options_file, weight_file, threads=torch.get_num_threads(), build=write_onnx)
            self.options = self._onnx.options
            self.model = None
        else:
            self.model: BidirectionalLM = load_bilm(options_file, weight_file, lstm_impl).to(self.device)
            self.options = self.model.options
        if self.options.char_cnn is None:
            raise InputError(f"{options_file}: word-input models need token ids; use the model directly")
        max_chars = self.options.char_cnn.max_characters_per_token
        self.char_mapper = (CharIdMapper.from_vocab_file(vocab_file, max_chars) if vocab_file
                            else CharIdMapper(max_chars))
        self._states = RowStates()
        self._token_table: Optional[torch.Tensor] = None
        if token_embedding_file is not None:
            if vocab_file is None:
                raise InputError("token_embedding_file needs vocab_file (the order of its rows)")
            self._load_token_table(token_embedding_file, vocab_file)

    # ----- token-embedding cache -----
    def _load_token_table(self, path: str, vocab_file: str) -> None:
        """The cache as a table indexed by the char mapper's rows. Tokens it lacks (<S>, </S>, words
        not in the vocab) go through the char CNN once and are added, so cache mode gives the same
        vectors as char mode for every token."""
        tokens = read_tokens(vocab_file)
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise WeightFileError(f"{path} is not a readable HDF5 file ({e})") from None
        with f, reading(path):
            if "embedding" not in f:
                raise WeightFileError(f"{path}: missing dataset 'embedding'")
            table = f["embedding"][...]
            if not np.issubdtype(table.dtype, np.number):
                raise WeightFileError(f"{path}: dataset 'embedding' holds {table.dtype}, not numbers")
        dim = self.model.options.projection_dim
        if table.shape != (len(tokens), dim):
            raise WeightFileError(f"{path}: dataset 'embedding' has shape {table.shape}, expected "
                                  f"({len(tokens)}, {dim}) for {vocab_file} and the options")
        rows = self.char_mapper.rows(tokens)
        n_rows = len(self.char_mapper) + 1
        missing = np.setdiff1d(np.arange(1, n_rows), rows)
        full = torch.zeros(n_rows, dim, device=self.device)
        full[torch.as_tensor(rows)] = torch.from_numpy(table.astype(np.float32)).to(self.device)
        full[torch.as_tensor(missing)] = self._char_cnn_rows(missing)
        self._token_table = full

    def _char_cnn_rows(self, rows) -> torch.Tensor:
        char_ids = torch.from_numpy(self.char_mapper.table[np.asarray(rows, dtype=np.int64)]).to(self.device)
        return self.model.embed_tokens(char_ids)

    def _token_vectors(self, sentences: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.char_mapper.batch_rows(sentences)
        mask = torch.from_numpy(rows > 0).to(self.device)
        if self._token_table is None:
            char_ids = torch.from_numpy(self.char_mapper.table[rows]).to(self.device)
            return self.model.embed_tokens(char_ids), mask
        n_known = len(self._token_table)
        if len(self.char_mapper) + 1 > n_known:  # new tokens since last call: char CNN once, then cached
            new = self._char_cnn_rows(np.arange(n_known, len(self.char_mapper) + 1))
            self._token_table = torch.cat([self._token_table, new])
        return self._token_table[torch.from_numpy(rows).to(self.device)], mask

    # ----- states -----
    def reset_states(self) -> None:
        """Forget the carried LSTM states: the next batch starts from zeros."""
        self._states.reset()

    # ----- embedding -----
    @torch.no_grad()
    def embed_batch(self, sentences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """One float32 array (n_layers + 1, n_tokens, 2 * projection_dim) per sentence."""
        if len(sentences) == 0:
            return []
        if self._onnx is not None:
            rows = self.char_mapper.batch_rows(sentences)  # may grow the table: index after
            layers = self._onnx.run(self.char_mapper.table[rows])  # (B, L, T + 2, D)
            return [layers[i, :, 1 : len(s) + 1].copy() for i, s in enumerate(sentences)]
        with autocast(self.device, self.precision):
            tokens, mask = self._token_vectors(sentences)
            state = self._states.get(len(sentences)) if self.stateful else None
            layers, new_state = self.model.contextualize(tokens, mask, state)
        if self.stateful:
            self._states.update(new_state, len(sentences))
        stacked = torch.stack(layers, dim=1).float().cpu().numpy()  # (B, L, T + 2, D)
        return [stacked[i, :, 1 : len(s) + 1].copy() for i, s in enumerate(sentences)]

    def embed_sentence(self, tokens: Sequence[str]) -> np.ndarray:
        return self.embed_batch([tokens])[0]

    # ----- raw text -----
    def tokenize_lines(self, lines: Sequence[str]) -> list[list[str]]:
        """Raw lines -> tokens with the model's pipeline (whitespace split when it has none)."""
        if self.text_pipeline is not None:
            return self.text_pipeline.tokenize_lines(list(lines))
        if not self._told_whitespace:
            self._told_whitespace = True
            print("note: this model has no tokenizer.json beside its options (a published model, or one "
                  "exported before bilm recorded tokenizers): raw text is split on whitespace", file=sys.stderr)
        return [line.split() for line in lines]

    def embed_text(self, text: str) -> tuple[list[str], np.ndarray]:
        """One raw sentence -> (its tokens, vectors (n_layers + 1, n_tokens, 2 * projection_dim))."""
        return next(self.embed_texts([text]))

    def embed_texts(self, texts: Iterable[str], batch_size: Optional[int] = None
                    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Raw sentences -> (tokens, vectors) each, tokenized with the model's pipeline."""
        batch_size = batch_size or self.batch_size
        iterator = iter(texts)
        while batch := list(islice(iterator, batch_size)):
            tokens = self.tokenize_lines(batch)
            yield from zip(tokens, self.embed_batch(tokens))

    def embed_sentences(self, sentences: Iterable[Sequence[str]], batch_size: Optional[int] = None
                        ) -> Iterator[np.ndarray]:
        batch_size = batch_size or self.batch_size
        iterator = iter(sentences)
        while batch := list(islice(iterator, batch_size)):
            yield from self.embed_batch(batch)

    def embed_file(self, input_file: str, output_file: str, output_format: str = "all",
                   batch_size: Optional[int] = None, progress: bool = True, pretokenized: bool = False,
                   force: bool = True, dtype: str = "float32") -> int:
        """Embed every line of ``input_file`` into ``output_file``: dataset ``str(i)`` for line i (its
        tokens in the attribute ``tokens``) and a JSON ``sentence_to_index`` dataset, as AllenNLP's
        ``elmo`` command. Lines are raw text tokenized with the model's pipeline, or with
        ``pretokenized`` already-tokenized text split on whitespace. Written to a temporary file
        first, so a failure never leaves a half-written output; ``force=False`` refuses to replace
        an existing ``output_file``.

        ``dtype``: "float32", or "float16" (half the file; each value is float32's rounded to the
        nearest float16). The file records it in its ``dtype`` attribute."""
        if output_format not in OUTPUT_FORMATS:
            raise InputError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        if dtype not in OUTPUT_DTYPES:
            raise InputError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
        if not force and os.path.exists(output_file):
            raise FileExistsError(f"{output_file} already exists; pass --force to overwrite it")
        try:
            with open(input_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError:
            raise InputError(not_utf8(input_file)) from None
        tokenized = [line.split() for line in lines] if pretokenized else self.tokenize_lines(lines)
        if pretokenized or self.text_pipeline is None or self.text_pipeline.tokenizer == "whitespace":
            warn_suspicious_lines(self.text_pipeline or TextPipeline(), ((i + 1, t) for i, t in enumerate(tokenized)),
                                  input_file, self.options.char_cnn.max_characters_per_token)
        sentence_to_index: dict[str, str] = {}
        with atomic_path(output_file) as tmp:
            with h5py.File(tmp, "w") as out:
                vectors = self.embed_sentences(tokenized, batch_size)
                bar = progress_bar(zip(lines, tokenized, vectors), total=len(lines), unit="sent", desc="embed",
                                   disable=not progress)
                for i, (line, tokens, emb) in enumerate(bar):
                    if output_format == "top":
                        emb = emb[-1]
                    elif output_format == "average":
                        emb = emb.mean(axis=0)
                    emb = self._checked(emb, dtype, input_file, i + 1)
                    dataset = out.create_dataset(str(i), data=emb)
                    dataset.attrs["tokens"] = json.dumps(tokens, ensure_ascii=False)
                    sentence_to_index[line] = str(i)
                # AllenNLP's layout: a (1,) string dataset holding the JSON.
                index = out.create_dataset("sentence_to_index", (1,), dtype=h5py.string_dtype())
                index[0] = json.dumps(sentence_to_index)
                out.attrs["dtype"] = dtype
        return len(lines)


    def _checked(self, emb: np.ndarray, dtype: str, input_file: str, line: int) -> np.ndarray:
        """``emb`` as ``dtype``, or an ``InputError`` (nothing is written) when it holds NaN or inf, or
        a value float16 cannot hold: a file of such vectors would pass for a good one."""
        if not np.isfinite(emb).all():
            found = non_finite_weights(self.model) if self.model is not None else ""
            raise InputError(f"{input_file}, line {line}: the model gives vectors holding NaN or inf "
                             + (f"(its weights hold {found}; " if found else "(")
                             + "a diverged or damaged model?); nothing written")
        with np.errstate(over="ignore"):  # said below, in one line
            out = emb.astype(dtype, copy=False)
        if dtype == "float16" and not np.isfinite(out).all():
            raise InputError(f"{input_file}, line {line}: a vector value ({float(np.abs(emb).max()):.4g}) exceeds "
                             f"float16's range (±{float(np.finfo(np.float16).max):,.0f}); use --dtype float32; "
                             "nothing written")
        return out


@torch.no_grad()
def dump_token_embeddings(vocab_file: str, options_file: str, weight_file: str, output_file: str,
                          batch_size: int = 512, device: str = "cpu", progress: bool = True) -> int:
    """Write the context-independent token vectors of every vocab token (bilm-tf's
    ``dump_token_embeddings``): dataset ``embedding`` (n_tokens, projection_dim), vocab order.

    Batch by batch into the file: memory does not grow with the vocabulary (an 800k-word table
    is 1.6 GB), nor are the tokens' char ids cached (each token is seen once)."""
    tokens = read_tokens(vocab_file)
    model = load_bilm(options_file, weight_file).to(device)
    max_characters = model.options.char_cnn.max_characters_per_token
    with atomic_path(output_file) as tmp:
        with h5py.File(tmp, "w") as f:
            table = f.create_dataset("embedding", shape=(len(tokens), model.options.projection_dim), dtype="float32")
            for start in progress_bar(range(0, len(tokens), batch_size), desc="tokens", disable=not progress):
                chunk = tokens[start : start + batch_size]
                char_ids = torch.from_numpy(char_id_table(chunk, max_characters)).to(device)
                vectors = model.embed_tokens(char_ids).cpu().numpy()
                if not np.isfinite(vectors).all():
                    found = non_finite_weights(model)
                    raise InputError(f"{weight_file}: the token vectors of {vocab_file} hold NaN or inf"
                                     + (f" (the weights hold {found})" if found else "") + "; nothing written")
                table[start : start + len(chunk)] = vectors
    return len(tokens)
