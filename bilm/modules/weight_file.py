"""The published ELMo weight file in and out of modules (bilm-tf's ``dump_weights`` layout, what AllenNLP reads).

One table, ``_datasets``, maps each dataset name to a parameter and the (exact) layout
change between the two: transposes, the TF conv kernel shape, the [x, h] stacked LSTM
kernel, and the 261-row char embedding (our row 0 is the mask). Loading and saving both
use it, so an export re-imports bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bilm.core.options import BiLMOptions
from bilm.formats.weights import WeightFileError, dataset_names, open_weight_file, reading
from bilm.modules.bidirectional import BidirectionalLM
from bilm.modules.token_encoder import CharCNNEncoder


@dataclass
class _Dataset:
    name: str
    to_file: Callable[[], np.ndarray]           # parameter -> array in the file's layout
    from_file: Callable[[np.ndarray], None]      # array in the file's layout -> parameter
    shape: tuple[int, ...]                       # expected shape in the file


def _copy_into(param: torch.Tensor, value: np.ndarray) -> None:
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def _linear(name: str, linear: torch.nn.Linear, prefix: str, w: str, b: str) -> list[_Dataset]:
    # TF computes x @ W + b, so the file holds the transpose of torch's weight.
    return [
        _Dataset(f"{prefix}/{w}", lambda: linear.weight.detach().cpu().numpy().T,
                 lambda a: _copy_into(linear.weight, a.T), tuple(linear.weight.shape[::-1])),
        _Dataset(f"{prefix}/{b}", lambda: linear.bias.detach().cpu().numpy(),
                 lambda a: _copy_into(linear.bias, a), tuple(linear.bias.shape)),
    ]


def _char_cnn_datasets(encoder: CharCNNEncoder) -> list[_Dataset]:
    emb = encoder.char_embedding.weight
    out = [_Dataset("char_embed", lambda: emb.detach().cpu().numpy()[1:],
                    lambda a: _copy_into(emb[1:], a), (emb.shape[0] - 1, emb.shape[1]))]
    for i, conv in enumerate(encoder.convolutions):
        n_filters, char_dim, width = conv.weight.shape

        def conv_to_file(conv=conv):  # torch (n, E, w) -> TF (1, w, E, n)
            return conv.weight.detach().cpu().numpy().transpose(2, 1, 0)[None]

        def conv_from_file(a, conv=conv):
            _copy_into(conv.weight, a[0].transpose(2, 1, 0))

        out.append(_Dataset(f"CNN/W_cnn_{i}", conv_to_file, conv_from_file, (1, width, char_dim, n_filters)))
        out.append(_Dataset(f"CNN/b_cnn_{i}", lambda conv=conv: conv.bias.detach().cpu().numpy(),
                            lambda a, conv=conv: _copy_into(conv.bias, a), (n_filters,)))
    if encoder.highway is not None:
        for k, (carry, transform) in enumerate(zip(encoder.highway.carry, encoder.highway.transform)):
            out += _linear("", carry, f"CNN_high_{k}", "W_carry", "b_carry")
            out += _linear("", transform, f"CNN_high_{k}", "W_transform", "b_transform")
    if encoder.projection is not None:
        out += _linear("", encoder.projection, "CNN_proj", "W_proj", "b_proj")
    return out


def _lstm_datasets(model: BidirectionalLM) -> list[_Dataset]:
    out = []
    for direction, stack in enumerate((model.forward_lstm, model.backward_lstm)):
        for k, layer in enumerate(stack.layers):
            prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell"

            def kernel_to_file(layer=layer):  # TF kernel: [x, h] @ W_0
                return torch.cat([layer.input_weight, layer.state_weight], dim=1).detach().cpu().numpy().T

            def kernel_from_file(a, layer=layer):
                _copy_into(layer.input_weight, a[: layer.input_dim].T)
                _copy_into(layer.state_weight, a[layer.input_dim:].T)

            out.append(_Dataset(f"{prefix}/W_0", kernel_to_file, kernel_from_file,
                                (layer.input_dim + layer.projection_dim, 4 * layer.cell_dim)))
            out.append(_Dataset(f"{prefix}/B", lambda layer=layer: layer.bias.detach().cpu().numpy(),
                                lambda a, layer=layer: _copy_into(layer.bias, a), (4 * layer.cell_dim,)))
            if layer.projection_weight is not None:
                proj = layer.projection_weight
                out.append(_Dataset(f"{prefix}/W_P_0", lambda proj=proj: proj.detach().cpu().numpy().T,
                                    lambda a, proj=proj: _copy_into(proj, a.T), (layer.cell_dim, layer.projection_dim)))
    return out


def _datasets(model: BidirectionalLM) -> list[_Dataset]:
    encoder = model.token_encoder
    if isinstance(encoder, CharCNNEncoder):
        token_part = _char_cnn_datasets(encoder)
    else:
        table = encoder.embedding.weight
        token_part = [_Dataset("embedding", lambda: table.detach().cpu().numpy()[1:],
                               lambda a: _copy_into(table[1:], a), (table.shape[0] - 1, table.shape[1]))]
    return token_part + _lstm_datasets(model)


def load_weights(model: BidirectionalLM, weight_file: str) -> None:
    """Copy every dataset of ``weight_file`` into ``model``; errors name the dataset and the file."""
    with open_weight_file(weight_file) as f, reading(weight_file):
        load_weight_arrays(model, f, weight_file)


def load_weight_arrays(model: BidirectionalLM, arrays, source: str, ignore: tuple[str, ...] = ()) -> None:
    """Copy arrays in the published layout, by dataset name (an open HDF5 file or a dict of numpy
    arrays), into ``model``. The arrays must be exactly what the options describe: a missing or an
    unused dataset (e.g. options with fewer layers than the file holds) is an error naming it and
    ``source``; names in ``ignore`` may be present."""
    expected = _datasets(model)
    unused = sorted(set(dataset_names(arrays)) - {ds.name for ds in expected} - set(ignore))
    if unused:
        more = f" and {len(unused) - 4} more" if len(unused) > 4 else ""
        raise WeightFileError(f"{source}: holds datasets the options do not describe: {', '.join(unused[:4])}{more} "
                              f"(do the options match these weights? n_layers, n_highway, filters, dims)")
    for ds in expected:
        if ds.name not in arrays:
            raise WeightFileError(f"{source}: missing dataset '{ds.name}' (the options ask for it)")
        try:
            array = np.asarray(arrays[ds.name][...])
        except (OSError, KeyError) as e:
            raise WeightFileError(f"{source}: cannot read dataset '{ds.name}' ({e}); truncated file?") from None
        if tuple(array.shape) != ds.shape:
            raise WeightFileError(f"{source}: dataset '{ds.name}' has shape {tuple(array.shape)}, "
                                  f"the options imply {ds.shape}")
        ds.from_file(array)


def save_weights(model: BidirectionalLM, weight_file: str) -> None:
    """Write ``model`` in the published layout (float32)."""
    with open_weight_file(weight_file, "w") as f:
        for ds in _datasets(model):
            f.create_dataset(ds.name, data=np.asarray(ds.to_file(), dtype=np.float32))


def load_bilm(options_file: str, weight_file: str, lstm_impl: str = "fused") -> BidirectionalLM:
    """A ``BidirectionalLM`` in eval mode from ``options.json`` + ``weights.hdf5``."""
    options = BiLMOptions.from_file(options_file)
    if options.char_cnn is None and options.n_tokens_vocab is None:
        # Word-input files: the table's size comes from the weight file.
        with open_weight_file(weight_file) as f, reading(weight_file):
            if "embedding" not in f:
                raise WeightFileError(f"{weight_file}: missing dataset 'embedding' (options have no 'char_cnn')")
            options.n_tokens_vocab = int(f["embedding"].shape[0])
    model = BidirectionalLM(options, lstm_impl=lstm_impl)
    load_weights(model, weight_file)
    return model.eval()
