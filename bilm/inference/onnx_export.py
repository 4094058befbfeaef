"""The stateless biLM as an ONNX model: char ids in, ELMo layers out, servable without PyTorch.

The graph is the embedder's ``stateful=False`` computation (``BidirectionalLM.forward`` from
zero states): the char CNN, then both LSTM stacks, the backward one reading each sentence
reversed within its length. The LSTM recurrence is a TorchScript loop, which the TorchScript
exporter turns into one ONNX ``Loop`` over the time steps, so batch size and sentence length
are both dynamic. (The fused path's per-step Python loop and host-side mask checks would be
unrolled by tracing to one fixed length; ONNX's own LSTM op has neither the projection nor
the cell clip of bilm-tf's cell.) No state goes in or out: stateful embedding is PyTorch only.

Interface of the file (``ONNX_FORMAT`` names it; ``bilm.inference.onnx_runtime`` checks it on loading):

- input ``char_ids``: int32 (batch, steps, max_characters_per_token), shifted ids as
  ``CharIdMapper.batch`` makes them, ``<S>`` and ``</S>`` around each sentence, 0 = padding;
- output ``layers``: float32 (batch, n_layers + 1, steps, 2 * projection_dim): the token layer
  (its vector twice) and each LSTM layer, forward and backward concatenated; zero at padding;
- metadata: the format, bilm's version, the options (JSON) and the weights file's SHA-256.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from bilm.core.version import __version__
from bilm.core.atomic import atomic_path
from bilm.core.digest import sha256_file
from bilm.core.errors import InputError, MissingExtra
from bilm.core.files import ONNX_FILE, OPTIONS_FILE, SERVING_FILES
from bilm.modules.bidirectional import BidirectionalLM, reverse_padded
from bilm.modules.lstm.cell import GATES, plus_forget_bias
from bilm.inference.onnx_runtime import (INPUT_NAME, META_FORMAT, META_OPTIONS, META_VERSION, META_WEIGHTS_SHA256,
                                         MISSING_EXTRA, ONNX_FORMAT, OUTPUT_NAME, canonical_options)
from bilm.modules.weight_file import load_bilm

OPSET = 17

if GATES != "ijfo":  # the scripted step below spells the blocks out in this order
    raise ImportError(f"bilm.inference.onnx_export assumes gate order 'ijfo', the cell uses {GATES!r}")


def _recurrence_eager(xz: torch.Tensor, w_hh_t: torch.Tensor, w_proj_t: torch.Tensor, keep: torch.Tensor,
                      cell_clip: float, proj_clip: float) -> torch.Tensor:
    """One direction's layer from zero states. xz (T, B, 4C): input projections with the bias
    (forget bias included); w_hh_t (P, 4C); w_proj_t (C, P) (the identity when the layer has no
    projection); keep (T, B, 1) bool. Returns outputs (T, B, P), zero where not kept; a masked
    step leaves the state as it was (the fused path's semantics). One direction per loop with 2-D
    weights: onnxruntime packs a constant 2-D right-hand side once, a batched (3-D) one every step."""
    n_steps, batch_size, four_c = xz.shape
    n_cells = four_c // 4
    h = torch.zeros(batch_size, w_hh_t.shape[0], dtype=xz.dtype)
    c = torch.zeros(batch_size, n_cells, dtype=xz.dtype)
    outputs: list[torch.Tensor] = []
    for t in range(n_steps):
        z = xz[t] + torch.mm(h, w_hh_t)
        i, j, f, o = z.chunk(4, dim=-1)
        c_new = torch.clamp(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(j), -cell_clip, cell_clip)
        h_new = torch.clamp(torch.mm(torch.sigmoid(o) * torch.tanh(c_new), w_proj_t), -proj_clip, proj_clip)
        k = keep[t]
        outputs.append(torch.where(k, h_new, torch.zeros_like(h_new)))
        h = torch.where(k, h_new, h)
        c = torch.where(k, c_new, c)
    return torch.stack(outputs, dim=0)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what the ONNX exporter reads loops from
    _recurrence = torch.jit.script(_recurrence_eager)


class StatelessBiLM(nn.Module):
    """``BidirectionalLM`` from zero states, written for export: char ids (B, T, C) -> layers
    (B, n_layers + 1, T, 2P). Copies the model's parameters as 2-D buffers per layer and direction
    (transposed, forget bias folded in); each direction's layer runs as its own loop (see
    ``_recurrence_eager``)."""

    def __init__(self, bilm: BidirectionalLM):
        super().__init__()
        if not bilm.char_inputs:
            raise InputError("the ONNX export needs a char-CNN model (word-input models take token ids)")
        self.encoder = bilm.token_encoder
        lstm = bilm.options.lstm
        self.skip = lstm.use_skip_connections
        no_clip = float("inf")
        self.cell_clip = lstm.cell_clip if lstm.cell_clip else no_clip
        self.proj_clip = lstm.proj_clip if lstm.proj_clip else no_clip
        for k, (fwd, bwd) in enumerate(zip(bilm.forward_lstm.layers, bilm.backward_lstm.layers)):
            pair = (fwd, bwd)
            for d, layer in enumerate(pair):  # 2-D per direction: see _recurrence_eager
                self.register_buffer(f"w_ih_t_{k}_{d}", layer.input_weight.detach().t().contiguous())
                self.register_buffer(f"bias_{k}_{d}", plus_forget_bias(layer.bias.detach()))
                self.register_buffer(f"w_hh_t_{k}_{d}", layer.state_weight.detach().t().contiguous())
                proj = (layer.projection_weight.detach().t().contiguous() if layer.projection_weight is not None
                        else torch.eye(layer.cell_dim))
                self.register_buffer(f"w_proj_t_{k}_{d}", proj)
        self.n_lstm_layers = lstm.n_layers

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        batch_size, n_steps, n_chars = char_ids.shape
        mask = char_ids[:, :, 0] > 0
        # The CNN once per distinct token, as the eager path (a batch repeats its frequent words); ONNX's
        # Unique (with an axis) takes int64 in onnxruntime, hence the cast.
        distinct, inverse = torch.unique(char_ids.reshape(-1, n_chars).long(), dim=0, return_inverse=True)
        tokens = self.encoder.encode_distinct(distinct)[inverse].reshape(batch_size, n_steps, -1)
        tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        lengths = mask.sum(dim=1)
        # Time-major, both directions stacked: (2, T, B, P).
        x = torch.stack([tokens, reverse_padded(tokens, lengths)]).transpose(1, 2)
        keep = mask.t().unsqueeze(-1).unsqueeze(0).expand(2, -1, -1, -1)
        layers = [torch.cat([tokens, tokens], dim=-1)]
        for k in range(self.n_lstm_layers):
            # All steps' input projections in one matmul per direction, as the fused path.
            y = torch.stack([
                _recurrence(torch.addmm(getattr(self, f"bias_{k}_{d}"), x[d].reshape(-1, x.shape[-1]),
                                        getattr(self, f"w_ih_t_{k}_{d}")).reshape(n_steps, batch_size, -1),
                            getattr(self, f"w_hh_t_{k}_{d}"), getattr(self, f"w_proj_t_{k}_{d}"), keep[d],
                            self.cell_clip, self.proj_clip)
                for d in range(2)])
            if self.skip and k > 0:
                y = y + x
            forward_out, backward_out = y[0].transpose(0, 1), y[1].transpose(0, 1)
            layers.append(torch.cat([forward_out, reverse_padded(backward_out, lengths)], dim=-1))
            x = y
        return torch.stack(layers, dim=1)


def write_onnx(options_file: str, weight_file: str, output_file: str, force: bool = False) -> str:
    """Build the ONNX model of ``options_file`` + ``weight_file`` into ``output_file`` (via a
    temporary name: an interrupted export leaves no file behind). Returns ``output_file``."""
    try:
        import onnx
    except ImportError:
        raise MissingExtra(MISSING_EXTRA) from None
    if not force and os.path.exists(output_file):
        raise FileExistsError(f"{output_file} already exists; pass --force to overwrite it")
    bilm = load_bilm(options_file, weight_file).eval()
    module = StatelessBiLM(bilm).eval()
    n_chars = bilm.options.char_cnn.max_characters_per_token
    example = torch.zeros(2, 5, n_chars, dtype=torch.int32)
    example[:, :, 0] = 259  # any non-zero id: a real position
    example[1, 3:] = 0      # a padded row, so the export sees masking
    directory = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(directory, exist_ok=True)
    with atomic_path(output_file) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer hints
            torch.onnx.export(module, (example,), tmp, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch", 1: "steps"},
                                            OUTPUT_NAME: {0: "batch", 2: "steps"}})
        model = onnx.load(tmp)
        metadata = {META_FORMAT: str(ONNX_FORMAT), META_VERSION: __version__,
                    META_OPTIONS: json.dumps(canonical_options(bilm.options.to_dict()), sort_keys=True),
                    META_WEIGHTS_SHA256: sha256_file(weight_file)}
        onnx.helper.set_model_props(model, metadata)
        model.doc_string = ("bilm stateless biLM: char_ids int32 (batch, steps, chars) with <S> </S> around each "
                            "sentence, 0 = padding -> layers float32 (batch, n_layers, steps, 2 * projection_dim)")
        onnx.save(model, tmp)
    return output_file


def export_onnx_dir(options_file: str, weight_file: str, out_dir: str, force: bool = False) -> list[str]:
    """``bilm export-onnx``: ``out_dir/model.onnx`` and, when ``out_dir`` is not the model's own
    directory, the files the runtime reads beside it (options, tokenizer, vocab) copied from there.
    Refuses to replace any of them without ``force``; returns the names written."""
    import shutil


    source_dir = os.path.dirname(os.path.abspath(options_file))
    names = [ONNX_FILE]
    if os.path.abspath(out_dir) != source_dir:
        names += [OPTIONS_FILE] + [n for n in SERVING_FILES
                                   if n != OPTIONS_FILE and os.path.isfile(os.path.join(source_dir, n))]
    existing = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite")
    os.makedirs(out_dir, exist_ok=True)
    write_onnx(options_file, weight_file, os.path.join(out_dir, ONNX_FILE), force=True)
    for name in names[1:]:
        source = options_file if name == OPTIONS_FILE else os.path.join(source_dir, name)
        shutil.copyfile(source, os.path.join(out_dir, name))
    return names


def check_onnx_target(out_dir: str, force: bool) -> None:
    """``bilm export --format onnx``: the extra is installed and ``model.onnx`` may be written,
    checked before the export writes anything."""
    from bilm.inference.onnx_runtime import _import_onnxruntime

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingExtra(MISSING_EXTRA) from None
    _import_onnxruntime()
    if not force and os.path.exists(os.path.join(out_dir, ONNX_FILE)):
        raise FileExistsError(f"{os.path.join(out_dir, ONNX_FILE)} already exists; pass --force to overwrite")
