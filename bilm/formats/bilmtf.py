"""bilm-tf's TensorFlow training checkpoints, read without TensorFlow, and its names.

TensorFlow's V2 format is an index file (a LevelDB-style table of tensor name -> dtype, shape,
offset) and a data file of raw little-endian tensors. ``split_tensors`` separates a checkpoint's
weights (in the published weight file's names) from its Adagrad accumulators;
``config_from_bilmtf_options`` reads bilm-tf's ``options.json`` as a bilm config dict.
"""
from __future__ import annotations

import os
import re
import struct

import numpy as np

from bilm.core.errors import InputError

# ----------------------------------------------------------------------------- the TF checkpoint

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48            # two block handles (<= 20 bytes each, padded) + 8-byte magic
_BLOCK_TRAILER_SIZE = 5      # compression type + crc32c
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
           10: np.bool_, 14: np.uint16, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
_DT_STRING = 7


class TFCheckpointError(InputError):
    """A TensorFlow checkpoint that cannot be read; the message names the file."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) of a serialized protobuf message: ints for varints/fixed, bytes otherwise."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def _read_block(data: bytes, offset: int, size: int, path: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one table block (prefix-compressed keys, restart array at the end)."""
    if offset + size + _BLOCK_TRAILER_SIZE > len(data):
        raise TFCheckpointError(f"{path}: block at {offset} runs past the end of the file (truncated?)")
    if data[offset + size] != 0:
        raise TFCheckpointError(f"{path}: compressed table block (type {data[offset + size]}); "
                                "only uncompressed checkpoint indexes (what TensorFlow writes) are supported")
    block = data[offset:offset + size]
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_length, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos:pos + value_length]))
        pos += value_length
    return entries


def _read_index(index_path: str) -> dict[str, bytes]:
    with open(index_path, "rb") as f:
        data = f.read()
    if len(data) < _FOOTER_SIZE:
        raise TFCheckpointError(f"{index_path}: too short for a TensorFlow checkpoint index")
    footer = data[-_FOOTER_SIZE:]
    magic = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)[0]
    if magic != _TABLE_MAGIC:
        raise TFCheckpointError(f"{index_path}: not a TensorFlow checkpoint index (bad magic number)")
    pos = 0
    for _ in range(2):  # the metaindex handle (unused), then the index handle
        offset, pos = _varint(footer, pos)
        size, pos = _varint(footer, pos)
    entries = {}
    for _, handle in _read_block(data, offset, size, index_path):
        block_offset, p = _varint(handle, 0)
        block_size, _ = _varint(handle, p)
        for key, value in _read_block(data, block_offset, block_size, index_path):
            entries[key.decode("utf-8")] = value
    return entries


def read_tf_checkpoint(prefix: str, mmap: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a TensorFlow V2 checkpoint (``prefix.index`` + ``prefix.data-*``), by variable name.

    String tensors are skipped; partitioned (sliced) variables are refused with a clear error.
    ``mmap``: the tensors are copy-on-write views of the mapped data files, read from disk only
    where they are used (the published checkpoint is 4 GB: softmax and its accumulators).
    """
    index_path = prefix + ".index"
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"TensorFlow checkpoint not found: {index_path}")
    entries = _read_index(index_path)
    header = dict(_proto_fields(entries.pop("", b"")))
    n_shards = int(header.get(1, 1))
    if header.get(2, 0) != 0:
        raise TFCheckpointError(f"{index_path}: big-endian checkpoint")
    shards: dict[int, bytes] = {}
    tensors = {}
    for name, value in sorted(entries.items()):
        fields = _proto_fields(value)
        entry = dict(fields)
        if any(number == 7 for number, _ in fields):
            raise TFCheckpointError(f"{index_path}: variable '{name}' is partitioned (sliced); not supported")
        dtype_code = int(entry.get(1, 0))
        if dtype_code == _DT_STRING:
            continue
        if dtype_code not in _DTYPES:
            raise TFCheckpointError(f"{index_path}: variable '{name}' has TensorFlow dtype {dtype_code}, not supported")
        shape = [int(dict(_proto_fields(dim)).get(1, 0))
                 for number, dim in _proto_fields(entry.get(2, b"")) if number == 2]
        shard, offset, size = int(entry.get(3, 0)), int(entry.get(4, 0)), int(entry.get(5, 0))
        if shard not in shards:
            data_path = f"{prefix}.data-{shard:05d}-of-{n_shards:05d}"
            if not os.path.exists(data_path):
                raise FileNotFoundError(f"TensorFlow checkpoint data not found: {data_path}")
            if mmap:
                shards[shard] = np.memmap(data_path, dtype=np.uint8, mode="c") if os.path.getsize(data_path) \
                    else np.zeros(0, np.uint8)  # numpy cannot map an empty file
            else:
                with open(data_path, "rb") as f:
                    shards[shard] = f.read()
        raw = shards[shard][offset:offset + size]
        dtype = np.dtype(_DTYPES[dtype_code]).newbyteorder("<")
        if len(raw) != size or size != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise TFCheckpointError(f"{index_path}: variable '{name}' ({size} bytes at {offset}) does not fit "
                                    f"shape {shape}; truncated data file?")
        if mmap:
            tensor = raw.view(dtype).reshape(shape)
            tensors[name] = tensor if dtype.isnative else tensor.astype(dtype.newbyteorder("="))
        else:
            tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return tensors


def latest_tf_checkpoint(save_dir: str) -> str:
    """The prefix named by ``save_dir/checkpoint`` (TensorFlow's ``latest_checkpoint``)."""
    listing = os.path.join(save_dir, "checkpoint")
    try:
        with open(listing, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise FileNotFoundError(f"{listing}: cannot read ({e.strerror}); is {save_dir} a bilm-tf save_dir?") from None
    match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', text, re.M)
    if not match:
        raise TFCheckpointError(f"{listing}: no model_checkpoint_path line")
    prefix = match.group(1)
    if not os.path.isabs(prefix):
        prefix = os.path.join(save_dir, prefix)
    if not os.path.exists(prefix + ".index"):
        # The directory was moved since TensorFlow wrote the absolute path: look beside the listing.
        prefix = os.path.join(save_dir, os.path.basename(prefix))
    return prefix


# ----------------------------------------------------------------------------- names

def published_name(tf_name: str) -> str:
    """bilm-tf variable name -> dataset name in the published weight file (bilm-tf's ``dump_weights`` rule)."""
    name = tf_name[len("lm/"):] if tf_name.startswith("lm/") else tf_name
    for old, new in (("/rnn/", "/RNN/"), ("/multi_rnn_cell/", "/MultiRNNCell/"), ("/cell_", "/Cell"),
                     ("/lstm_cell/", "/LSTMCell/")):
        name = name.replace(old, new)
    if "/RNN/" in name:
        if "projection" in name:
            name = name.replace("projection/kernel", "W_P_0")
        else:
            name = re.sub("/kernel$", "/W_0", name)
            name = re.sub("/bias$", "/B", name)
    return name


def _one_layer_as_stack(name: str) -> str:
    """A one-layer bilm-tf LSTM has no MultiRNNCell scope; bilm's table names every layer of a stack."""
    return re.sub(r"^(RNN_\d+/RNN)/LSTMCell/", r"\1/MultiRNNCell/Cell0/LSTMCell/", name)


_ACCUMULATOR = "/Adagrad"


def split_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """A bilm-tf checkpoint's tensors -> (weights by published name incl. softmax/W and softmax/b,
    Adagrad accumulators by the same names, global step)."""
    weights, accumulators = {}, {}
    for name, value in tensors.items():
        if not name.startswith("lm/"):
            continue  # global_step, train_perplexity
        if name.endswith(_ACCUMULATOR):
            accumulators[_one_layer_as_stack(published_name(name[:-len(_ACCUMULATOR)]))] = value
        else:
            weights[_one_layer_as_stack(published_name(name))] = value
    step = tensors.get("global_step")
    return weights, accumulators, int(step) if step is not None else 0


# ----------------------------------------------------------------------------- options.json

def config_from_bilmtf_options(options: dict) -> dict:
    """bilm-tf's ``options.json`` as a bilm config dict: the architecture and its training settings."""
    from bilm.core.options import BiLMOptions

    model = BiLMOptions.from_dict(options, where="options.json").to_dict()
    if "char_cnn" in model:
        model["char_cnn"]["n_characters"] = 261  # the training setting, as bilm-tf's file says
    train = {key: options[key] for key in ("batch_size", "unroll_steps", "n_epochs", "n_train_tokens", "dropout",
                                           "n_negative_samples_batch") if key in options}
    if options.get("sample_softmax", True) is False and options.get("n_tokens_vocab"):
        train["n_negative_samples_batch"] = options["n_tokens_vocab"]  # >= V: the full softmax, as bilm-tf
    optim = {"name": "adagrad", "lr": options.get("learning_rate", 0.2), "initial_accumulator_value": 1.0,
             "loss_scale": "unroll_steps"}
    if "all_clip_norm_val" in options:
        optim["max_grad_norm"] = options["all_clip_norm_val"]
    return {"model": model, "train": train, "optim": optim}
