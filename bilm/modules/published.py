"""Published ELMo models by name, downloaded once into a cache; or your own model by directory.

``resolve_model("original")`` returns the paths of ``options.json`` and ``weights.hdf5``,
downloading them into ``$BILM_CACHE`` (default ``~/.cache/bilm``) the first time. A download
goes to ``*.partial`` and is renamed when complete and checked (the size the server announced;
the weights open as HDF5 with the shapes the options describe), so an interrupted download
never looks finished; the next attempt resumes it with an HTTP range request where the server
allows one. With ``BILM_OFFLINE=1`` nothing is downloaded: a cached model is used, a missing
one is an error naming the URL and the path to put the file at by hand.

The names are AllenNLP's published models (its ``elmo`` command and ELMo page): ``small``,
``medium``, ``original``, ``original-5.5b``. A directory holding ``options.json`` and
``weights.hdf5`` (what ``bilm export`` writes) works everywhere a name does. ``original-tf`` is the
original's bilm-tf training checkpoint (``resolve_tf_checkpoint``), which ``bilm train --init-model``
continues with its softmax and optimizer state.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from bilm.core.errors import BilmError, InputError
from bilm.core.files import OPTIONS_FILE, WEIGHTS_FILE
from bilm.core.progress import progress_bar


ALLENNLP_BASE = "https://allennlp.s3.amazonaws.com/models/elmo"
DEFAULT_MODEL = "original"


class ModelUnavailable(BilmError, FileNotFoundError):
    """A model that is neither cached nor downloadable now; the message says what to do."""


@dataclass(frozen=True)
class PublishedModel:
    name: str
    options_url: str
    weights_url: str
    description: str = ""
    parameters_millions: Optional[float] = None  # as AllenNLP's ELMo page lists them
    approx_mb: Optional[int] = None               # size of the weights file, about

    @classmethod
    def allennlp(cls, name: str, stem: str, description: str, parameters_millions: float) -> "PublishedModel":
        url = f"{ALLENNLP_BASE}/{stem}/elmo_{stem}"
        # The weight file holds the parameters in float32 (the softmax is not published).
        return cls(name, f"{url}_options.json", f"{url}_weights.hdf5", description, parameters_millions,
                   round(parameters_millions * 4))


MODELS: dict[str, PublishedModel] = {m.name: m for m in (
    PublishedModel.allennlp("small", "2x1024_128_2048cnn_1xhighway",
                            "LSTM 2 x 1024 projected to 128, 1 highway; 1B Word Benchmark", 13.6),
    PublishedModel.allennlp("medium", "2x2048_256_2048cnn_1xhighway",
                            "LSTM 2 x 2048 projected to 256, 1 highway; 1B Word Benchmark", 28.0),
    PublishedModel.allennlp("original", "2x4096_512_2048cnn_2xhighway",
                            "LSTM 2 x 4096 projected to 512, 2 highway; 1B Word Benchmark (the ELMo paper's)", 93.6),
    PublishedModel.allennlp("original-5.5b", "2x4096_512_2048cnn_2xhighway_5.5B",
                            "the original architecture trained on 5.5B tokens (Wikipedia + WMT news)", 93.6),
)}


# bilm-tf's README: "Can you provide the tensorflow checkpoint from training?" lists these files
# (and a .meta graph, which bilm does not need), beside the published weights.
BILMTF_BASE = "https://s3-us-west-2.amazonaws.com/allennlp/models/elmo"


@dataclass(frozen=True)
class PublishedTFCheckpoint:
    """A bilm-tf training ``save_dir`` on a server (``files`` below ``url``) and the vocabulary its softmax
    rows follow: what ``bilm train --init-model NAME`` continues, softmax and optimizer state included."""
    name: str
    url: str
    files: tuple[str, ...]
    vocab_url: str
    description: str = ""
    approx_mb: Optional[int] = None  # all files, about


TF_CHECKPOINTS: dict[str, PublishedTFCheckpoint] = {c.name: c for c in (
    PublishedTFCheckpoint(
        "original-tf", f"{BILMTF_BASE}/2x4096_512_2048cnn_2xhighway_tf_checkpoint",
        ("checkpoint", OPTIONS_FILE, "model.ckpt-935588.index", "model.ckpt-935588.data-00000-of-00001"),
        f"{BILMTF_BASE}/vocab-2016-09-10.txt",
        "the training checkpoint of 'original' (step 935,588): its softmax over 793,471 words and Adagrad state",
        # weights (93.6M) + softmax (793,471 x 513) and as many accumulators, float32
        4005),
)}


def register_tf_checkpoint(checkpoint: PublishedTFCheckpoint) -> None:
    """Add (or replace) a named bilm-tf training checkpoint."""
    TF_CHECKPOINTS[_key(checkpoint.name)] = checkpoint


def tf_checkpoint_entry(name: str) -> Optional[PublishedTFCheckpoint]:
    return TF_CHECKPOINTS.get(_key(name))


def resolve_tf_checkpoint(model: str, vocab_file: Optional[str] = None, progress: bool = True) -> tuple[str, str]:
    """(save_dir, vocab file) of a bilm-tf training checkpoint: a registered name (downloaded to the
    cache once, then checked) or a local ``save_dir`` with the vocab it was trained with."""
    entry = tf_checkpoint_entry(model)
    if entry is None:
        if not os.path.isfile(os.path.join(model, "checkpoint")):
            raise FileNotFoundError(f"{model}: not a bilm-tf save_dir (no 'checkpoint' file) and not one of "
                                    f"{', '.join(sorted(TF_CHECKPOINTS))}")
        if vocab_file is None:
            raise InputError(f"{model} is a bilm-tf save_dir: give --init-vocab, the vocab file it was trained with")
        return model, vocab_file
    if vocab_file is not None:
        raise InputError(f"{entry.name!r} comes with its vocabulary ({entry.vocab_url}): drop --init-vocab")
    directory = os.path.join(cache_dir(), _key(entry.name))
    wanted = [(f"{entry.url}/{name}", os.path.join(directory, name)) for name in entry.files]
    wanted.append((entry.vocab_url, os.path.join(directory, os.path.basename(entry.vocab_url))))
    missing = [(url, path) for url, path in wanted if not os.path.isfile(path)]
    if missing and offline():
        raise ModelUnavailable("BILM_OFFLINE is set and the cache lacks " + "; ".join(
            f"{path} (download {url})" for url, path in missing) + ": put the files there by hand")
    fetched = [fetch(url, path, progress, f"{entry.name} {os.path.basename(path)}") for url, path in wanted]
    if any(fetched):
        _check_tf_checkpoint(directory, wanted[-1][1], [path for _, path in wanted], entry)
    return directory, wanted[-1][1]


def _check_tf_checkpoint(directory: str, vocab_file: str, paths: list[str], entry: PublishedTFCheckpoint) -> None:
    """Every tensor of the index lies inside the data file and the vocabulary has a word per softmax
    row; else every file goes (the data file is mapped: nothing is read but the index)."""
    from bilm.formats.bilmtf import latest_tf_checkpoint, read_tf_checkpoint
    from bilm.core.vocab import read_tokens

    try:
        tensors = read_tf_checkpoint(latest_tf_checkpoint(directory), mmap=True)
        rows = tensors["lm/softmax/W"].shape[0] if "lm/softmax/W" in tensors else None
        if rows is None:
            raise ValueError("no lm/softmax/W variable")
        del tensors
        n_tokens = len(read_tokens(vocab_file))
        if n_tokens != rows:
            raise InputError(f"{vocab_file} has {n_tokens:,} tokens for {rows:,} softmax rows")
    except (ValueError, OSError) as e:
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
        raise ModelUnavailable(f"the download of {entry.name!r} is not a usable bilm-tf checkpoint ({e}); it was "
                               "removed, the next use downloads it again") from None


def register(model: PublishedModel) -> None:
    """Add (or replace) a named model, e.g. one your organisation serves."""
    MODELS[_key(model.name)] = model


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def cache_dir() -> str:
    return os.environ.get("BILM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bilm")


def offline() -> bool:
    return os.environ.get("BILM_OFFLINE", "") not in ("", "0")


def resolve_model(model: Optional[str] = None, progress: bool = True) -> tuple[str, str]:
    """(options.json, weights.hdf5) of a registered name (downloaded to the cache once) or of a directory."""
    model = DEFAULT_MODEL if model is None else model
    if os.path.isdir(model):
        paths = os.path.join(model, OPTIONS_FILE), os.path.join(model, WEIGHTS_FILE)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{model}: a model directory holds {OPTIONS_FILE} and {WEIGHTS_FILE}; "
                                    f"missing {', '.join(missing)}")
        return paths
    entry = MODELS.get(_key(model))
    if entry is None and _key(model) in TF_CHECKPOINTS:
        raise InputError(f"{model!r} is a bilm-tf training checkpoint: continue it with bilm train --init-model "
                         f"{model}, or use its published weights ({DEFAULT_MODEL!r})")
    if entry is None:
        raise InputError(f"unknown model {model!r}: give one of {', '.join(sorted(MODELS))}, or a directory "
                         f"holding {OPTIONS_FILE} and {WEIGHTS_FILE}")
    directory = os.path.join(cache_dir(), _key(entry.name))
    options, weights = os.path.join(directory, OPTIONS_FILE), os.path.join(directory, WEIGHTS_FILE)
    fetched = [fetch(entry.options_url, options, progress, f"{entry.name} options"),
               fetch(entry.weights_url, weights, progress, f"{entry.name} weights")]
    if any(fetched):
        _check_model(options, weights, entry)
    return options, weights


def model_files(options_file: Optional[str] = None, weight_file: Optional[str] = None,
                progress: bool = True) -> tuple[str, str]:
    """What ``ElmoEmbedder`` and ``Elmo`` accept: both files (local paths, or http(s) URLs as AllenNLP
    users pass them), or only the first as a model name or directory, or nothing (``original``)."""
    if weight_file is None:
        return resolve_model(options_file, progress)
    if options_file is None:
        raise InputError("weight_file was given without options_file")
    return tuple(cached_url(f, progress) if f.startswith(("http://", "https://")) else f
                 for f in (options_file, weight_file))


def cached_url(url: str, progress: bool = True) -> str:
    """A local copy of any http(s) URL (AllenNLP's ``cached_path`` for the URLs its users pass)."""
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + os.path.basename(url.split("?")[0])
    path = os.path.join(cache_dir(), "urls", name)
    fetch(url, path, progress, os.path.basename(path))
    return path


def _check_model(options: str, weights: str, entry: PublishedModel) -> None:
    """The downloaded weights open as HDF5 with the shapes the options describe; else both go."""
    from bilm.modules.weight_file import load_bilm

    try:
        load_bilm(options, weights)
    except (ValueError, OSError) as e:
        for path in (options, weights):
            if os.path.exists(path):
                os.remove(path)
        raise ModelUnavailable(f"the download of {entry.name!r} is not a usable model ({e}); it was removed, "
                               "the next use downloads it again") from None


# ----------------------------------------------------------------------------- downloading

def fetch(url: str, path: str, progress: bool = True, label: str = "", attempts: int = 4) -> bool:
    """Make sure ``path`` holds ``url``: True when it was downloaded now, False when it was cached."""
    if os.path.isfile(path):
        return False
    if offline():
        raise ModelUnavailable(f"{path} is not in the cache and BILM_OFFLINE is set: download {url} and put "
                               f"it there by hand")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:  # one downloader per file, across processes
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if os.path.isfile(path):  # another process finished it meanwhile
            return False
        for attempt in range(1, attempts + 1):
            try:
                _download(url, path, progress, label or os.path.basename(path))
                return True
            except _Incomplete as e:
                if attempt == attempts:
                    raise ModelUnavailable(f"cannot download {url}: {e} after {attempts} attempts; the partial "
                                           f"file {path}.partial is kept and resumed next time") from None
                time.sleep(min(2 ** attempt * 0.25, 4))
            except urllib.error.HTTPError as e:
                raise ModelUnavailable(f"cannot download {url}: HTTP {e.code} {e.reason}; put the file at {path} "
                                       "by hand, or set BILM_OFFLINE=1 to use only the cache") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
                raise ModelUnavailable(f"cannot download {url}: {reason}; put the file at {path} by hand, "
                                       "or set BILM_OFFLINE=1 to use only the cache") from None
    raise AssertionError("unreachable: the last attempt returns or raises")


class _Incomplete(Exception):
    """The transfer ended early; the partial file is kept for the next attempt."""


def _download(url: str, path: str, progress: bool, label: str) -> None:
    partial = path + ".partial"
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "bilm", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is not a prefix the server knows: start over
            os.remove(partial)
            raise _Incomplete("the server refused to resume") from None
        raise
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as f, \
                progress_bar(total=total, initial=have, unit="B", unit_scale=True, desc=f"download {label}",
                     disable=not progress, file=sys.stderr) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, ValueError, http.client.HTTPException) as e:  # connection reset, IncompleteRead
                    raise _Incomplete(str(e) or type(e).__name__) from None
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(partial)
    if total is not None and size != total:
        raise _Incomplete(f"got {size:,} of {total:,} bytes")
    os.replace(partial, path)
