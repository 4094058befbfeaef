"""Write bilm-tf save_dirs without TensorFlow, for the continue-from-bilm-tf benchmarks.

    python benchmarks/tf_save_dir.py from-run --run RUN_DIR --out SAVE_DIR      # a bilm run as bilm-tf saved it
    python benchmarks/tf_save_dir.py synthetic --vocab-size 793471 --out SAVE_DIR  # elmo_original's shapes, random

A save_dir is what bilm-tf's ``train()`` leaves: ``checkpoint`` (the listing), ``options.json``,
``model.ckpt-N.index`` (a LevelDB-style table: tensor name -> dtype, shape, offset) and
``model.ckpt-N.data-00000-of-00001`` (the tensors, raw little-endian), plus the ``vocab.txt`` of
its softmax rows. Variables have bilm-tf's names (``lm/RNN_0/rnn/multi_rnn_cell/cell_0/lstm_cell/
kernel``, ``lm/softmax/W``) and each has its Adagrad slot (``.../Adagrad``). The files are written
in the layout ``bilm.formats.bilmtf.read_tf_checkpoint`` reads; they carry no CRC32C checksums, so
TensorFlow itself would refuse them: they stand in for a real bilm-tf run where TensorFlow is not
installed, and for the 4 GB published checkpoint (which cannot be downloaded here).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_MAGIC = 0xDB4775248B80FB57
_DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.int64): 9}
ROWS_PER_WRITE = 1 << 15


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """A protobuf field: ints as varints, bytes length-delimited."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A table block, keys unshared, one restart point, then the trailer (no compression, no CRC)."""
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1) + b"\0" * 5


def write_tf_checkpoint(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    """``prefix.index`` + ``prefix.data-00000-of-00001`` holding ``tensors`` (float32 or int64), written
    a slice of rows at a time (a ``np.memmap`` is never read whole)."""
    entries = []
    with open(f"{prefix}.data-00000-of-00001", "wb") as data:
        for name in sorted(tensors):
            array = tensors[name]
            dtype = np.dtype(array.dtype)
            offset = data.tell()
            if array.ndim == 0:
                data.write(np.asarray(array, dtype.newbyteorder("<")).tobytes())
            for start in range(0, array.shape[0] if array.ndim else 0, ROWS_PER_WRITE):
                data.write(np.ascontiguousarray(array[start:start + ROWS_PER_WRITE], dtype.newbyteorder("<")).tobytes())
            shape = b"".join(_field(2, _field(1, int(d))) for d in array.shape)
            entry = _field(1, _DTYPE_CODES[dtype]) + (_field(2, shape) if array.ndim else _field(2, b"")) + \
                _field(4, offset) + _field(5, data.tell() - offset)
            entries.append((name.encode(), entry))
    header = _field(1, 1) + _field(3, _field(1, 1))  # one shard, little-endian; version {producer: 1}
    data_block = _block([(b"", header), *entries])
    index = bytearray(data_block)
    data_handle = _varint(0) + _varint(len(data_block) - 5)
    meta_offset = len(index)
    index += _block([])
    meta_size = len(index) - meta_offset - 5
    index_offset = len(index)
    index += _block([(entries[-1][0] if entries else b"", data_handle)])
    handles = _varint(meta_offset) + _varint(meta_size) + _varint(index_offset) + \
        _varint(len(index) - index_offset - 5)
    index += handles + b"\0" * (40 - len(handles)) + struct.pack("<Q", _MAGIC)
    with open(f"{prefix}.index", "wb") as f:
        f.write(bytes(index))


def tf_name(published: str) -> str:
    """Dataset name of the published weight file -> bilm-tf variable name (``bilm.formats.bilmtf.published_name``
    backwards, for stacks of any depth)."""
    name = published
    if "/RNN/" in name:
        name = name.replace("W_P_0", "projection/kernel")
        name = re.sub("/W_0$", "/kernel", name)
        name = re.sub("/B$", "/bias", name)
    for new, old in (("/rnn/", "/RNN/"), ("/multi_rnn_cell/", "/MultiRNNCell/"), ("/cell_", "/Cell"),
                     ("/lstm_cell/", "/LSTMCell/")):
        name = name.replace(old, new)
    return "lm/" + name


def _published_arrays(bilm_module) -> dict[str, np.ndarray]:
    """A ``BidirectionalLM``'s parameters in the published layout, by dataset name."""
    import h5py

    from bilm.modules.weight_file import save_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.hdf5")
        save_weights(bilm_module, path)
        out = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
    return out


def write_save_dir(out: str, options: dict, vocab: list[str], step: int, weights: dict[str, np.ndarray],
                   accumulators: dict[str, np.ndarray]) -> str:
    """A bilm-tf save_dir: weights and accumulators by published name (softmax/W, softmax/b included)."""
    os.makedirs(out, exist_ok=True)
    tensors = {tf_name(k): v for k, v in weights.items()}
    tensors.update({tf_name(k) + "/Adagrad": v for k, v in accumulators.items()})
    tensors["global_step"] = np.array(step, dtype=np.int64)
    prefix = os.path.join(out, f"model.ckpt-{step}")
    write_tf_checkpoint(prefix, tensors)
    with open(os.path.join(out, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n')
    with open(os.path.join(out, "options.json"), "w") as f:
        json.dump(options, f)
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return prefix


def from_run(run: str, out: str) -> str:
    """The newest checkpoint of a bilm run (Adagrad) as a bilm-tf save_dir with its vocab."""
    import copy

    import torch

    from bilm.runs.trained_model import model_from_checkpoint, resolve_checkpoint

    trained = model_from_checkpoint(run)
    cfg = trained.config
    _, payload = resolve_checkpoint(trained.path, mmap=True)
    sums = payload["optimizer"]["state"]
    model = trained.model
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the optimizer state follows model.parameters() order
        for i, param in enumerate(twin.parameters()):
            param.copy_(sums[i]["sum"])
    weights, accumulators = _published_arrays(model.bilm), _published_arrays(twin.bilm)
    for arrays, m in ((weights, model), (accumulators, twin)):
        arrays["softmax/W"] = m.softmax.weight.detach().numpy()
        arrays["softmax/b"] = m.softmax.bias.detach().numpy()
    options = {**cfg.model.to_dict(), "n_tokens_vocab": len(trained.vocab), "batch_size": cfg.train.batch_size,
               "unroll_steps": cfg.train.unroll_steps, "n_negative_samples_batch": cfg.train.n_negative_samples_batch,
               "dropout": cfg.train.dropout, "learning_rate": cfg.optim.lr, "all_clip_norm_val": cfg.optim.max_grad_norm}
    options["char_cnn"]["n_characters"] = 261
    return write_save_dir(out, options, trained.vocab, int(payload["step"]), weights, accumulators)


def synthetic(out: str, vocab_size: int, config: str, seed: int = 0) -> str:
    """Random weights with the shapes of ``config``'s architecture and a ``vocab_size`` softmax,
    accumulators >= 1; the softmax and its accumulators go through mapped temporary files."""
    from bilm.runs.config import load_config
    from bilm.modules.bidirectional import BidirectionalLM

    options = load_config(config).model
    body = _published_arrays(BidirectionalLM(options))
    rng = np.random.default_rng(seed)
    dim = options.lstm.projection_dim
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out)
    big = {}
    for name in ("W", "W_acc"):
        big[name] = np.memmap(os.path.join(tmp, name), dtype=np.float32, mode="w+", shape=(vocab_size, dim))
        for start in range(0, vocab_size, ROWS_PER_WRITE):
            rows = rng.standard_normal((min(ROWS_PER_WRITE, vocab_size - start), dim), dtype=np.float32)
            big[name][start:start + len(rows)] = rows * 0.05 if name == "W" else 1.0 + np.abs(rows)
    weights = {**body, "softmax/W": big["W"], "softmax/b": rng.standard_normal(vocab_size, dtype=np.float32)}
    accumulators = {**{k: np.ones_like(v) for k, v in body.items()}, "softmax/W": big["W_acc"],
                    "softmax/b": np.ones(vocab_size, np.float32)}
    vocab = ["</S>", "<S>", "<UNK>", *(f"w{i}" for i in range(vocab_size - 3))]  # the published order
    raw = options.to_dict()
    raw.get("char_cnn", {})["n_characters"] = 261
    prefix = write_save_dir(out, {**raw, "n_tokens_vocab": vocab_size}, vocab, 935588, weights, accumulators)
    del big, weights, accumulators
    for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
    return prefix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-run")
    a.add_argument("--run", required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("synthetic")
    b.add_argument("--vocab-size", type=int, default=793471)
    b.add_argument("--config", default=os.path.join(ROOT, "configs", "elmo_original.yaml"),
                   help="the architecture (its model section)")
    b.add_argument("--out", required=True)
    args = p.parse_args()
    prefix = from_run(args.run, args.out) if args.command == "from-run" else \
        synthetic(args.out, args.vocab_size, args.config)
    print(f"wrote {prefix}.*")


if __name__ == "__main__":
    main()
