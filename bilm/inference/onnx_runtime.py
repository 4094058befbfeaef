"""Run the ONNX biLM that ``bilm.inference.onnx_export`` writes, with onnxruntime and numpy only (no PyTorch).

``OnnxBiLM(path, options_file)`` checks the file (its format, and that it was built from these
options and, when given, these weights) and maps char ids to ELMo layers. ``onnx_model_path``
finds the model's ONNX file: ``model.onnx`` in the model's directory when present, else one
built once into ``$BILM_CACHE/onnx/`` (keyed by the options and weights files' contents).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from typing import Callable, Optional

import numpy as np

from bilm.core.digest import sha256_file
from bilm.core.errors import InputError, MissingExtra
from bilm.core.files import ONNX_FILE, OPTIONS_FILE, WEIGHTS_FILE

# The graph's interface (input, output, semantics). Bump it when that changes: files of another
# format are refused with a message saying how to rebuild them.
ONNX_FORMAT = 1
INPUT_NAME, OUTPUT_NAME = "char_ids", "layers"
META_FORMAT, META_VERSION = "bilm.onnx_format", "bilm.version"
META_OPTIONS, META_WEIGHTS_SHA256 = "bilm.options", "bilm.weights_sha256"
MISSING_EXTRA = "the ONNX runtime needs the onnx extra: pip install 'bilm[onnx]' (or pip install onnx onnxruntime)"


class OnnxModelError(InputError):
    """An ONNX file that is not this bilm's stateless biLM, or not the one of the given model."""


def canonical_options(options: dict) -> dict:
    """Options as compared between a file and the ONNX model: n_characters (261 or 262 both load)
    and n_tokens_vocab (unused by a char model) left out."""
    options = json.loads(json.dumps(options))
    options.get("char_cnn", {}).pop("n_characters", None)
    options.pop("n_tokens_vocab", None)
    return options


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtra(MISSING_EXTRA) from None
    return onnxruntime


class OnnxBiLM:
    """An ONNX biLM session: ``run(char_ids)`` -> layers, as ``StatelessBiLM`` computes them."""

    def __init__(self, path: str, options_file: str, weight_file: Optional[str] = None,
                 threads: Optional[int] = None, weights_sha256: Optional[str] = None):
        """``weight_file`` (or its known ``weights_sha256``): check the file was built from those
        weights too; ``threads``: onnxruntime's intra-op threads (default: its own choice)."""
        ort = _import_onnxruntime()
        from bilm.core.options import BiLMOptions

        self.path = path
        self.options = BiLMOptions.from_file(options_file)
        options = self.options
        options_dict = options.to_dict()
        session_options = ort.SessionOptions()
        if threads:
            session_options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, session_options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own classes for unreadable files
            raise OnnxModelError(f"{path} is not a readable ONNX model ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        found = meta.get(META_FORMAT)
        if found != str(ONNX_FORMAT):
            made_by = f"bilm {meta[META_VERSION]}" if META_VERSION in meta else "not bilm"
            raise OnnxModelError(
                f"{path}: ONNX format {found or 'none'} ({made_by}); this bilm reads format {ONNX_FORMAT}: "
                f"rebuild it with `bilm export-onnx` (or delete it: it is rebuilt into the cache)")
        try:
            built_from = json.loads(meta.get(META_OPTIONS, "null"))
        except json.JSONDecodeError:
            built_from = None
        if built_from != canonical_options(options_dict):
            raise OnnxModelError(f"{path} was built from other options than {options_file}; rebuild it with "
                                 f"`bilm export-onnx` for this model")
        if weight_file is not None and weights_sha256 is None:
            weights_sha256 = sha256_file(weight_file)
        if weights_sha256 is not None and meta.get(META_WEIGHTS_SHA256) != weights_sha256:
            raise OnnxModelError(f"{path} was built from other weights than {weight_file or 'the given weights'}; "
                                 "rebuild it with `bilm export-onnx` for this model")
        self.n_layers = options.lstm.n_layers + 1
        self.output_dim = 2 * options.projection_dim

    def run(self, char_ids: np.ndarray) -> np.ndarray:
        """char_ids (B, T, C) int, ``<S>``/``</S>`` included, 0 = padding -> (B, n_layers, T, 2P) float32."""
        if char_ids.shape[0] == 0 or char_ids.shape[1] == 0:
            return np.zeros((char_ids.shape[0], self.n_layers, char_ids.shape[1], self.output_dim), np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(char_ids, dtype=np.int32)})[0]


def onnx_model_path(options_file: str, weight_file: Optional[str], build: Optional[Callable[[str, str, str], object]] = None,
                    progress: bool = True) -> tuple[str, Optional[str]]:
    """The ONNX file for a model and the SHA-256 of its weights (None without weights): the
    model directory's ``model.onnx`` when present, else ``$BILM_CACHE/onnx/KEY/model.onnx``, built
    now if missing by ``build(options_file, weight_file, path)`` (``bilm.inference.onnx_export.write_onnx``, which
    needs PyTorch: the caller passes it, so this module imports no exporter; once per model, one
    builder at a time)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(options_file)), ONNX_FILE)
    weights_sha = sha256_file(weight_file) if weight_file is not None and os.path.isfile(weight_file) else None
    if os.path.isfile(beside):
        return beside, weights_sha
    if weight_file is None:
        raise FileNotFoundError(f"no {ONNX_FILE} beside {options_file} and no weights to build one from")
    from bilm.modules.published import cache_dir

    with open(options_file, "rb") as f:
        key = hashlib.sha256(f.read() + b"\0" + weights_sha.encode()).hexdigest()[:24]
    directory = os.path.join(cache_dir(), "onnx", key)
    path = os.path.join(directory, ONNX_FILE)
    if os.path.isfile(path):
        return path, weights_sha
    os.makedirs(directory, exist_ok=True)
    with open(path + ".lock", "w") as lock:  # one builder per model, across processes
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not os.path.isfile(path):
            if build is None:
                raise FileNotFoundError(f"no {ONNX_FILE} beside {options_file} (build one with bilm export-onnx)")
            if progress:
                import sys
                print(f"building the ONNX model of {weight_file} once, into {path}", file=sys.stderr)
            build(options_file, weight_file, path)
    return path, weights_sha


def check_onnx_arguments(stateful: Optional[bool], precision: str, token_embedding_file: Optional[str],
                         device) -> None:
    """What the ONNX runtime does not do, refused in one line each."""
    if stateful:
        raise InputError("runtime 'onnx' is stateless (no LSTM states in or out of the ONNX model): pass "
                         "stateful=False (bilm embed: --stateless), or use runtime 'torch' for stateful vectors")
    if precision != "fp32":
        raise InputError(f"runtime 'onnx' runs fp32 only, got precision {precision!r}")
    if token_embedding_file is not None:
        raise InputError("runtime 'onnx' reads char ids: token_embedding_file (--token-embeddings) is for runtime 'torch'")
    if str(device) not in ("cpu", "-1"):
        raise InputError(f"runtime 'onnx' runs on the CPU (onnxruntime's CPU provider), got device {device!r}")
    _import_onnxruntime()  # a missing extra fails here, before anything is downloaded or built


def serving_files(options_file: Optional[str], weight_file: Optional[str]) -> tuple[str, Optional[str]]:
    """``model_files`` for the ONNX runtime: a directory with ``options.json`` + ``model.onnx`` (what
    ``bilm export-onnx`` writes), or that ``options.json`` itself, needs no weights; anything else as
    ``model_files``."""
    from bilm.modules.published import model_files

    if weight_file is None and options_file is not None:
        if os.path.isdir(options_file):
            directory, options = options_file, os.path.join(options_file, OPTIONS_FILE)
        else:
            directory, options = os.path.dirname(os.path.abspath(options_file)), options_file
        weights = os.path.join(directory, WEIGHTS_FILE)
        if os.path.isfile(options) and os.path.isfile(os.path.join(directory, ONNX_FILE)):
            return options, weights if os.path.isfile(weights) else None
    return model_files(options_file, weight_file)


def load_onnx_bilm(options_file: str, weight_file: Optional[str], threads: Optional[int] = None,
                   build: Optional[Callable[[str, str, str], object]] = None) -> OnnxBiLM:
    """The checked session of a model's ONNX file (found or built by ``onnx_model_path``)."""
    path, weights_sha256 = onnx_model_path(options_file, weight_file, build)
    return OnnxBiLM(path, options_file, weight_file, threads=threads, weights_sha256=weights_sha256)
