"""The checkpoint file: what it holds, written atomically, read with the safe loader.

A checkpoint is one ``torch.save`` file holding the model, the optimizer, the step, the
resolved config, and per-rank state (data-reader positions, RNG states, carried LSTM states).
A write goes to a temporary file first and is renamed when complete: a killed write leaves
the previous checkpoints intact (``bilm.runs.run_dir`` removes its temporary at the next start).

Checkpoints are handed between people, so they are read with torch's safe unpickler
(``weights_only=True``): the payload is plain data only (tensors, numbers, strings, bytes,
lists, tuples, dicts), which ``save_checkpoint`` checks before writing. A file whose pickle
asks for anything else (a function to call: it could run code) is refused unread. Format 1
(bilm before the safe loader) held numpy RNG states: ``convert_checkpoint`` (``bilm
convert-checkpoint``) rewrites such a file as format 2, reading it with only numpy's array
constructors allowed besides the safe set.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import shutil
import zipfile
from typing import Any, Optional

import torch

from bilm.core.atomic import atomic_path
from bilm.core.errors import CheckpointWriteError, InputError

REQUIRED_KEYS = ("format", "step", "config", "model")
# 2: plain data only, read with the safe unpickler. 1: numpy RNG states inside (convert_checkpoint).
FORMAT = "bilm-checkpoint-2"
OLD_FORMAT = "bilm-checkpoint-1"
# A format-1 checkpoint loads safely when it holds no RNG states (import-bilm-tf's): accepted as is.
READABLE_FORMATS = (FORMAT, OLD_FORMAT)
# What format 1's numpy RNG states need from the unpickler beyond the safe set.
_OLD_FORMAT_GLOBALS = re.compile(r"numpy\.(_core|core)\.multiarray\._reconstruct|numpy\.ndarray|numpy\.dtype"
                                 r"|numpy\.dtypes\.\w+DType")


class CheckpointError(InputError):
    """An unreadable or incompatible checkpoint; the message names the file."""


class CheckpointRefused(CheckpointError):
    """A checkpoint that the safe loader will not read (it asks to call something); never skipped
    in favour of an older one, never renamed: the user decides what to do with it."""


def check_plain(value: Any, where: str = "payload") -> None:
    """Raise TypeError naming the first value in ``value`` that the safe unpickler would refuse."""
    if isinstance(value, (torch.Tensor, str, bytes, int, float, bool, type(None), torch.Size, torch.dtype,
                          torch.device)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}: a checkpoint holds only "
                    "tensors and plain data")


# The payload's schema: every key a checkpoint may hold and the types its value may take (None: null or
# absent). ``checkpoint_payload`` is the one writer of these keys and ``load_checkpoint`` the one reader,
# which checks a file against this table before anything uses it (checkpoints are handed around).
PAYLOAD_SCHEMA: dict[str, tuple] = {
    "format": (str,),                   # FORMAT (OLD_FORMAT: convert it first)
    "step": (int,),                     # steps done
    "config": (dict,),                  # config_to_dict of the run's config
    "model": (dict,),                   # the model's state dict
    "vocab": (list, None),              # the softmax rows' tokens
    "optimizer": (dict, None),          # its state; None: DeepSpeed keeps it beside, under deepspeed_tag
    "deepspeed_tag": (str, None),
    "world_size": (int, None),          # ranks that wrote rank_states
    "rank_states": (list, None),        # per rank: data position, random and LSTM states; None: start afresh
    "text_pipeline": (dict, None),      # TextPipeline.to_state(); None: not known
    "guard": (dict, None),              # the divergence guard's state (GuardState.to_dict)
    "metrics_bytes": (int, None),       # metrics.jsonl's length at this step (a rollback truncates to it)
    "heldout": (dict, None),            # the heldout figures at this step
    "imported_from": (str, None),       # import-bilm-tf: the TensorFlow checkpoint it came from
}


def checkpoint_payload(step: int, config: dict, model: dict, vocab: list[str], optimizer: Optional[dict] = None,
                       deepspeed_tag: Optional[str] = None, world_size: Optional[int] = None,
                       rank_states: Optional[list] = None, text_pipeline: Optional[dict] = None,
                       guard: Optional[dict] = None, metrics_bytes: Optional[int] = None,
                       heldout: Optional[dict] = None, imported_from: Optional[str] = None) -> dict[str, Any]:
    """What a checkpoint holds, for every writer (``bilm train``, ``bilm import-bilm-tf``); the keys and
    their meaning are ``PAYLOAD_SCHEMA``'s; ``save_checkpoint`` adds ``format``."""
    return {"step": step, "config": config, "model": model, "optimizer": optimizer, "deepspeed_tag": deepspeed_tag,
            "world_size": world_size, "rank_states": rank_states, "vocab": vocab, "text_pipeline": text_pipeline,
            "guard": guard, "metrics_bytes": metrics_bytes, "heldout": heldout, "imported_from": imported_from}


def save_checkpoint(payload: dict[str, Any], path: str) -> None:
    """Temporary file, flush to disk, then rename: a crash leaves the old files intact.

    A failed write (a full disk, a quota) removes its partial file and raises
    ``CheckpointWriteError`` naming the path, the reason and the free space."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    payload = {**payload, "format": FORMAT}
    check_plain(payload)  # what is written must be what the safe loader reads back
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason} ({_free_space(directory)} free); "
                                   "the previous checkpoints are intact") from None


def _free_space(directory: str) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1024:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TB"


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's payload. ``mmap``: its tensors map the file instead of being read into
    memory, so those never used (the optimizer state, for evaluate and export) cost nothing and
    the rest are read on first use (pages of the file: a writer renames a new file into place,
    never rewrites one, so the mapping stays valid)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a directory, not a checkpoint file")
    mmap = mmap and zipfile.is_zipfile(path)  # only torch.save's (default) zip format maps
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        _refuse_unsafe(path)
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({_first_line(e)})") from None
    except Exception as e:  # truncated zip, bad pickle, ...: all mean "unreadable"
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    return _checked(payload, path)


def _checked(payload: Any, path: str) -> dict[str, Any]:
    """The payload, checked against ``PAYLOAD_SCHEMA`` (keys it does not know are left alone)."""
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: not a bilm checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    for key, types in PAYLOAD_SCHEMA.items():
        value = payload.get(key)
        if value is None and None in types:
            continue
        allowed = tuple(t for t in types if t is not None)
        if not isinstance(value, allowed) or (int in allowed and isinstance(value, bool)):
            names = " or ".join("null" if t is None else t.__name__ for t in types)
            raise CheckpointError(f"{path}: checkpoint key '{key}' must be {names}, got {type(value).__name__}")
    if payload["step"] < 0 or (payload.get("world_size") is not None and payload["world_size"] < 1):
        raise CheckpointError(f"{path}: checkpoint key 'step' or 'world_size' out of range")
    if payload.get("vocab") is not None and not all(isinstance(t, str) for t in payload["vocab"]):
        raise CheckpointError(f"{path}: checkpoint key 'vocab' must be a list of strings")
    if payload.get("rank_states") is not None and len(payload["rank_states"]) != payload.get("world_size"):
        raise CheckpointError(f"{path}: checkpoint has {len(payload['rank_states'])} rank states for world_size "
                              f"{payload.get('world_size')}")
    return payload


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # torch's long message: its one useful line
    text = detail.group(1) if detail else text
    return text.splitlines()[0][:300] if text else type(e).__name__


def _unsafe_globals(path: str) -> list[str]:
    """The functions and classes the file's pickle would import beyond the safe set (read, never run)."""
    try:
        if zipfile.is_zipfile(path):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        return [n for n in _pickle_globals(path) if not n.startswith("torch.") and n != "collections.OrderedDict"]
    except Exception:  # too damaged to list: then it is simply unreadable
        return []


def _pickle_globals(path: str, max_bytes: int = 1 << 20) -> list[str]:
    """Names a plain pickle file (not torch's zip format) imports, from its opcodes alone."""
    import io
    import pickletools

    with open(path, "rb") as f:
        data = io.BytesIO(f.read(max_bytes))
    names, strings = [], []
    try:
        while data.tell() < len(data.getbuffer()):  # torch's legacy format: several pickles in a row
            for op, arg, _ in pickletools.genops(data):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # the end of what was read, or damage: report what was seen
        pass
    return names


def _refuse_unsafe(path: str) -> None:
    """Raise ``CheckpointRefused`` when the safe loader failed because the file asks to call something."""
    names = _unsafe_globals(path)
    if not names:
        return
    if all(_OLD_FORMAT_GLOBALS.fullmatch(n) for n in names):
        raise CheckpointRefused(f"{path}: written by an older bilm (checkpoint format 1, numpy RNG states), which "
                                f"the safe loader does not read; convert it once: bilm convert-checkpoint {path}")
    raise CheckpointRefused(f"{path}: refused: loading it would call {', '.join(sorted(names)[:5])} (a bilm "
                            "checkpoint holds only tensors and plain data; this file could run code). Nothing "
                            "was loaded; get the file again from a source you trust")


# What DeepSpeed's own optimizer files name besides the safe set (ZeRO 1/2, fp32/bf16 here). DeepSpeed
# reads them with the unsafe loader, so bilm looks at their pickles first (``check_deepspeed_state``).
_DEEPSPEED_GLOBALS = re.compile(r"deepspeed\.utils\.tensor_fragment\.fragment_address"
                                r"|deepspeed\.runtime\.fp16\.loss_scaler\.(Dynamic)?LossScaler"
                                r"|deepspeed\.runtime\.zero\.config\.ZeroStageEnum")


def check_deepspeed_state(directory: str) -> None:
    """Refuse (``CheckpointRefused``) DeepSpeed state files whose pickles would call anything but the
    few DeepSpeed classes it writes; read from the files' opcodes, nothing run."""
    for path in sorted(glob.glob(os.path.join(directory, "*.pt"))):
        names = [n for n in _unsafe_globals(path) if not _DEEPSPEED_GLOBALS.fullmatch(n)]
        if names:
            raise CheckpointRefused(f"{path}: refused: DeepSpeed would load it with Python's unsafe unpickler, and "
                                    f"it would call {', '.join(sorted(names)[:5])}, which DeepSpeed does not write "
                                    "(this file could run code). Nothing was loaded; get the run again from a "
                                    "source you trust")


def convert_checkpoint(path: str, out: Optional[str] = None) -> str:
    """Rewrite a format-1 checkpoint (numpy RNG states) as format 2; returns the path written.

    Read with the safe unpickler plus numpy's array constructors and nothing else (no function a
    file names can run), the numpy states turned into tensors, written atomically (in place unless
    ``out``)."""
    import numpy as np

    names = _unsafe_globals(path)
    if not all(_OLD_FORMAT_GLOBALS.fullmatch(n) for n in names):
        _refuse_unsafe(path)
    # The states' arrays are uint32; numeric dtypes only (an object array could hold anything).
    allowed = [np.ndarray, np.dtype, *(getattr(np.dtypes, n) for n in dir(np.dtypes)
                                       if re.fullmatch(r"(U?Int|Float)\d+DType", n))]
    multiarray = getattr(np, "_core", None) or np.core
    allowed.append(multiarray.multiarray._reconstruct)
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({_first_line(e)})") from None
    payload = _checked(payload, path)
    if payload["format"] == FORMAT:
        raise CheckpointError(f"{path}: already format {FORMAT}; nothing to convert")
    for rank_state in payload.get("rank_states") or []:
        rng = rank_state.get("rng") if isinstance(rank_state, dict) else None
        if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
            rng["numpy"] = numpy_rng_to_plain(rng["numpy"])
    target = out or path
    save_checkpoint({k: v for k, v in payload.items() if k != "format"}, target)
    return target


def numpy_rng_to_plain(state: tuple) -> dict:
    """``np.random.get_state()`` as plain data (the key array as an int64 tensor: exact)."""
    import numpy as np

    name, keys, pos, has_gauss, cached_gaussian = state
    return {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def numpy_rng_from_plain(state: dict) -> tuple:
    """The inverse of ``numpy_rng_to_plain``, for ``np.random.set_state``."""
    import numpy as np

    return (state["bit_generator"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["cached_gaussian"])


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     assign: bool = False) -> None:
    """``load_state_dict`` whose error lists the mismatched keys and shapes and names the file.
    ``assign``: the model takes the given tensors instead of copying them (for a model built on
    the meta device: no second copy of the weights)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not fit this model (another config?)"]
        if missing:
            lines.append("  missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("  unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, assign=assign)
