"""The LSTM with projection and clipping of bilm-tf (TF's LSTMCell with num_proj), and a stack of them.

Parameters keep TensorFlow's conventions so the published weights load and export
without arithmetic: gate blocks in TF order (i, j, f, o), the forget-gate bias stored
without TF's implicit +1.0 (added at compute time, as TF does).

Semantics of one step (``z = x W_ih + h W_hh + b``)::

    c = sigmoid(f + 1) * c_prev + sigmoid(i) * tanh(j);  c = clip(c, cell_clip)
    h = clip((sigmoid(o) * tanh(c)) W_proj, proj_clip)

Masked positions (``mask`` False) leave the state untouched and output zeros, like
TF's dynamic_rnn past a sequence's length.

Three implementations (``impl``), all with the same parameters and state dict:

``exact`` (default)
    The fast path with the semantics above. Input projections of all time steps in one
    batched matrix multiply; the recurrence is an autograd Function with a hand-written
    backward (per step only the two recurrent matrix multiplies and the pointwise gate
    math; weight gradients in one matrix multiply over all steps at the end). It runs D
    independent layers in lock step, stacked on a leading dim, so the forward and
    backward LMs advance in one ``bmm`` per step (``run_exact_stacks``). The per-step
    pointwise math can be fused with ``torch.compile`` (the ``compile`` argument of the
    layer and the stack: ``auto``, ``on``, ``off``; config key ``train.lstm_compile``).
    Gate math and the cell state are fp32 even under bf16 autocast.
``reference``
    The plain loop: one cell call per step, no precomputed input projection, autograd
    for the backward. For tests, and the baseline of the benchmarks.
``cudnn``
    PyTorch's ``nn.LSTM(proj_size=...)`` (cuDNN on GPU) fed with our parameters
    reordered on the fly. It cannot clip, so it refuses ``cell_clip``/``proj_clip``.
    Masks must be right-padded (each row a prefix of True); rows run packed to their
    lengths.

The cell is defined once (``GATES``, ``FORGET_BIAS``, ``_clip`` and the helpers next to
them): the three implementations read the gate layout, the forget bias and the clips from
there, and the stack around the layers (dropout, skip connections) is ``_run_layers`` for all.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bilm.errors import InputError
from bilm.options import LstmOptions

LSTM_IMPLS = ("exact", "reference", "cudnn")
COMPILE_MODES = ("auto", "on", "off")

State = tuple[torch.Tensor, torch.Tensor]  # (h: (B, projection_dim), c: (B, cell_dim))


# --------------------------------------------------------------------------------------
# The cell, defined once: the gate layout, the forget bias and the clips. The exact step,
# the reference cell and the cuDNN reorder all read them from here.
# --------------------------------------------------------------------------------------

# Order of the four gate blocks along the 4C dim of input_weight, state_weight and bias
# (TF's LSTMCell): i input gate, j new input (the tanh block), f forget gate, o output gate.
GATES = "ijfo"
# Added to the forget gate's pre-activation in the cell, never stored in the bias (as TF).
FORGET_BIAS = 1.0
# nn.LSTM's gate order (i, f, g, o), in our names: its g is our j.
_TORCH_LSTM_GATES = "ifjo"
_GATE_POSITIONS = tuple(GATES.index(g) for g in "ijfo")  # where i, j, f, o sit


def _split_gates(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., 4C) in GATES order -> views of the blocks (i, j, f, o), whatever that order."""
    blocks = x.chunk(4, dim=-1)
    return tuple(blocks[k] for k in _GATE_POSITIONS)  # type: ignore[return-value]


def _gate_block(x: torch.Tensor, gate: str, gates: str = GATES) -> torch.Tensor:
    """The (..., C) view of one gate's block of x (..., 4C) laid out in ``gates`` order."""
    n_cells = x.shape[-1] // 4
    k = gates.index(gate)
    return x[..., k * n_cells:(k + 1) * n_cells]


def _reorder_gates(w: torch.Tensor, gates: str) -> torch.Tensor:
    """w (4C, ...) from GATES order to ``gates`` order (a copy)."""
    blocks = w.chunk(4, dim=0)
    return torch.cat([blocks[GATES.index(g)] for g in gates], dim=0)


def _plus_forget_bias(bias: torch.Tensor, gates: str = GATES) -> torch.Tensor:
    """``bias`` (..., 4C) in ``gates`` order with FORGET_BIAS added to the forget block. TF adds
    it in every step (as the reference cell does); adding it once to the bias is the same sum
    (up to float rounding, ~1e-7) and saves a pointwise op per step."""
    forget = torch.zeros(bias.shape[-1], dtype=bias.dtype, device=bias.device)
    _gate_block(forget, "f", gates).fill_(FORGET_BIAS)
    return bias + forget


def _clip(x: torch.Tensor, value: Optional[float]) -> torch.Tensor:
    """The cell and projection clips: clamp to [-value, value]; None means no clip."""
    return x if value is None else x.clamp(-value, value)


def _clip_grad(grad: torch.Tensor, x: torch.Tensor, value: Optional[float]) -> torch.Tensor:
    """The gradient through ``_clip(x.float(), value)``: passed where -value <= x <= value
    (bounds included, as torch.clamp does), zero elsewhere."""
    return grad if value is None else grad * (x.float().abs() <= value)


# --------------------------------------------------------------------------------------
# The exact path: one step forward and backward, for D layers stacked on dim 0.
#
# Shapes: B batch, C cells, P projection (P == C and no projection matrix when the layer
# has none). ``keep`` is (D, B, 1) bool or None (no masking). Gate math runs in fp32; the
# matrix multiplies run in the dtype of the precomputed input part (bf16 under autocast).
# --------------------------------------------------------------------------------------

def _tanh(x: torch.Tensor, via_sigmoid: bool) -> torch.Tensor:
    """tanh(x). ``via_sigmoid``: as 2 sigmoid(2x) - 1, for CPU, where ATen's tanh measured ~6x
    slower than its sigmoid (x86, AVX-512 build); the identity is within ~2e-7 of tanh."""
    if not via_sigmoid:
        return torch.tanh(x)
    return torch.mul(x, 2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _activate_gates_(gates: torch.Tensor, tanh_via_sigmoid: bool) -> None:
    """The gate nonlinearities in place on the pre-activations (..., 4C): tanh on j, sigmoid on
    the others (f's FORGET_BIAS is already in the bias, see ``_plus_forget_bias``)."""
    j = _gate_block(gates, "j")
    if tanh_via_sigmoid:  # one sigmoid over all four blocks, j's doubled first: tanh(z) = 2 sigmoid(2z) - 1
        j.mul_(2.0)
        gates.sigmoid_()
        j.mul_(2.0).sub_(1.0)
    else:  # the blocks before j, j, the blocks after j
        n_cells, k = j.shape[-1], _GATE_POSITIONS[1]
        gates[..., :k * n_cells].sigmoid_()
        j.tanh_()
        gates[..., (k + 1) * n_cells:].sigmoid_()


def _step_forward(xz_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh_t: torch.Tensor,
                  w_proj_t: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                  cell_clip: Optional[float], proj_clip: Optional[float], tanh_via_sigmoid: bool):
    """One step. xz_t (D, B, 4C): input part with both biases; h (D, B, P) in the matmul dtype;
    c (D, B, C) fp32. Returns the step output, the carried (h, c) and what the backward needs."""
    # A fresh tensor, so the activations can overwrite it: it becomes the saved gates.
    gates = torch.baddbmm(xz_t, h, w_hh_t).float()
    _activate_gates_(gates, tanh_via_sigmoid)
    i, j, f, o = _split_gates(gates)
    c_raw = torch.addcmul(f * c, i, j)
    c_new = _clip(c_raw, cell_clip)
    tanh_c = _tanh(c_new, tanh_via_sigmoid)
    m = (o * tanh_c).to(xz_t.dtype)
    r = torch.bmm(m, w_proj_t) if w_proj_t is not None else m
    h_new = _clip(r.float(), proj_clip)
    if keep is None:
        out, h_next, c_next = h_new, h_new, c_new
    else:
        # where(), not arithmetic with the mask: kept rows must be bit-identical.
        out = torch.where(keep, h_new, 0.0)
        h_next = torch.where(keep, h_new, h.float())
        c_next = torch.where(keep, c_new, c)
    return out, h_next.to(h.dtype), c_next, gates, c_raw, tanh_c, m, r


def _step_backward(dh: torch.Tensor, dc: torch.Tensor, dout_t: torch.Tensor, gates: torch.Tensor,
                   c_raw: torch.Tensor, tanh_c: torch.Tensor, c_prev: torch.Tensor, r: torch.Tensor,
                   w_hh: torch.Tensor, w_proj: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                   cell_clip: Optional[float], proj_clip: Optional[float], dz: torch.Tensor):
    """Gradients through one step. dh (D, B, P), dc (D, B, C) fp32: gradients of the carried
    state after the step; dout_t the step output's. Writes the pre-activation gradient into dz
    (D, B, 4C, the matmul dtype) and returns the gradients of the state before the step and
    dr (D, B, P), the gradient of the projection's output."""
    dtype = r.dtype
    dh_new = dout_t.float() + dh
    if keep is not None:  # a masked row passes its state gradient straight through
        dh_skip, dc_skip = torch.where(keep, 0.0, dh), torch.where(keep, 0.0, dc)
        dh_new, dc = torch.where(keep, dh_new, 0.0), torch.where(keep, dc, 0.0)
    dr = _clip_grad(dh_new, r, proj_clip).to(dtype)
    dm = (torch.bmm(dr, w_proj) if w_proj is not None else dr).float()
    i, j, f, o = _split_gates(gates)
    dc_new = torch.addcmul(dc, dm * o, 1.0 - tanh_c * tanh_c)
    dc_raw = _clip_grad(dc_new, c_raw, cell_clip)
    # Gradient of each gate's activation output, then times the activation's derivative:
    # s (1 - s) for the sigmoids i, f, o and 1 - j^2 for tanh.
    # Written in place (no cat); in fp32 first when dz is bf16, rounded once at the end.
    dz32 = dz if dz.dtype == torch.float32 else torch.empty_like(gates)
    dz_i, dz_j, dz_f, dz_o = _split_gates(dz32)
    torch.mul(dc_raw, j, out=dz_i)
    torch.mul(dc_raw, i, out=dz_j)
    torch.mul(dc_raw, c_prev, out=dz_f)
    torch.mul(dm, tanh_c, out=dz_o)
    d_act = torch.addcmul(gates, gates, gates, value=-1.0)
    torch.addcmul(torch.ones_like(j), j, j, value=-1.0, out=_gate_block(d_act, "j"))
    dz32.mul_(d_act)
    if dz32 is not dz:
        dz.copy_(dz32)
    dc_prev = dc_raw * f
    dh_prev = torch.bmm(dz, w_hh).float()
    if keep is not None:
        dc_prev = dc_prev + dc_skip
        dh_prev = dh_prev + dh_skip
    return dh_prev, dc_prev, dr


# --------------------------------------------------------------------------------------
# Optional torch.compile of the two step functions (fuses the pointwise gate math).
#
# The mode belongs to the module that runs the step (the ``compile`` argument of
# LstmWithProjection and LstmStack): ``"on"``, ``"off"``, or ``"auto"`` (default; on for
# CUDA tensors only: on CPU at 2 cores compiling took ~20 s and did not pay for itself in
# our benchmarks, see ``benchmarks/lstm.py``). What is process-wide is only a cache: the
# compiled functions (PyTorch also caches kernels, in memory and on disk by Inductor), and
# that compiling failed once: then the eager step is used from then on, with a warning.
# --------------------------------------------------------------------------------------

_compiled: dict[str, Callable] = {}
_compile_failed = False


def _check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InputError(f"lstm compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return mode


def _step_functions(compile_mode: str, device: torch.device) -> tuple[Callable, Callable]:
    use = compile_mode == "on" or (compile_mode == "auto" and device.type == "cuda")
    if not use or _compile_failed or not hasattr(torch, "compile"):
        return _step_forward, _step_backward
    if not _compiled:
        _compiled["forward"] = torch.compile(_step_forward, dynamic=False)
        _compiled["backward"] = torch.compile(_step_backward, dynamic=False)
    return _compiled["forward"], _compiled["backward"]


def _call_step(fn: Callable, eager: Callable, *args):
    """Call a (possibly compiled) step; a failed compile falls back to eager for good."""
    global _compile_failed
    if fn is eager:
        return eager(*args)
    try:
        return fn(*args)
    except Exception as e:  # compile errors surface at the first call (no compiler, no triton, ...)
        _compile_failed = True
        warnings.warn(f"torch.compile of the LSTM step failed ({type(e).__name__}: {e}); "
                      "using the eager step", RuntimeWarning)
        return eager(*args)


def _per_step_keep(keep: Optional[torch.Tensor], n_steps: int) -> list[Optional[torch.Tensor]]:
    """keep (D, T, B, 1) -> per step keep (D, B, 1), or None where no row is masked (most steps
    of a padded batch), so those steps skip the masking. One host sync per call, not per step."""
    if keep is None:
        return [None] * n_steps
    all_kept = keep.flatten(2).all(dim=2).all(dim=0).tolist()
    return [None if kept else keep[:, t] for t, kept in enumerate(all_kept)]


def _run_recurrence(xz: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                    w_proj: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                    cell_clip: Optional[float], proj_clip: Optional[float], compile_mode: str, save: bool):
    """The forward loop. xz (D, T, B, 4C); h0 (D, B, P); c0 (D, B, C); w_hh (D, 4C, P);
    w_proj (D, P, C) or None; keep (D, T, B, 1) bool or None; compile_mode one of COMPILE_MODES.
    Returns out (D, T, B, P) in xz's dtype, h_T, c_T (fp32), and the per-step saved tensors."""
    dtype = xz.dtype
    w_hh_t = w_hh.to(dtype).transpose(1, 2)
    w_proj_t = w_proj.to(dtype).transpose(1, 2) if w_proj is not None else None
    h, c = h0.to(dtype), c0.float()
    step, _ = _step_functions(compile_mode, xz.device)
    # The sigmoid form of tanh pays on CPU, in eager mode (a compiled step fuses tanh itself).
    tanh_via_sigmoid = xz.device.type == "cpu" and step is _step_forward
    step_keep = _per_step_keep(keep, xz.shape[1])
    outputs, saved = [], []
    for t in range(xz.shape[1]):
        out, h_next, c_next, gates, c_raw, tanh_c, m, r = _call_step(
            step, _step_forward, xz[:, t], h, c, w_hh_t, w_proj_t, step_keep[t], cell_clip, proj_clip,
            tanh_via_sigmoid)
        if save:
            saved.append((h, c, gates, c_raw, tanh_c, m, r))
        outputs.append(out.to(dtype))
        h, c = h_next, c_next
    # Clones: the final state may be a saved tensor (r, c_raw), and outputs must not alias those.
    return torch.stack(outputs, dim=1), h.float().clone(), c.clone(), saved


class _Recurrence(torch.autograd.Function):
    """The recurrence of the exact path, with a hand-written backward: per step only the two
    recurrent matmuls and the pointwise math; the weight gradients in one bmm over all steps."""

    @staticmethod
    def forward(ctx, xz, h0, c0, w_hh, w_proj, keep, cell_clip, proj_clip, compile_mode):
        with torch.autocast(device_type=xz.device.type, enabled=False):  # dtypes handled by hand
            out, h, c, saved = _run_recurrence(xz, h0, c0, w_hh, w_proj, keep, cell_clip, proj_clip, compile_mode,
                                               save=True)
        ctx.save_for_backward(w_hh, w_proj, keep)
        ctx.steps = saved
        ctx.clips = (cell_clip, proj_clip)
        ctx.compile_mode = compile_mode
        ctx.state_dtypes = (h0.dtype, c0.dtype)
        return out, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_h, d_c):
        w_hh, w_proj, keep = ctx.saved_tensors
        cell_clip, proj_clip = ctx.clips
        steps, ctx.steps = ctx.steps, None
        n_dirs, n_steps, batch_size, _ = d_out.shape
        dtype = steps[0][5].dtype
        with torch.autocast(device_type=d_out.device.type, enabled=False):
            w_hh_c = w_hh.to(dtype)
            w_proj_c = w_proj.to(dtype) if w_proj is not None else None
            _, step = _step_functions(ctx.compile_mode, d_out.device)
            # Undefined (None) output gradients are zeros.
            dh = d_h.float() if d_h is not None else d_out.new_zeros(n_dirs, batch_size, w_hh.shape[-1], dtype=torch.float32)
            dc = d_c.float() if d_c is not None else torch.zeros_like(steps[0][1])
            d_xz = d_out.new_empty(n_dirs, n_steps, batch_size, w_hh.shape[1], dtype=dtype)  # (D, T, B, 4C)
            drs: list[torch.Tensor] = [None] * n_steps  # type: ignore[list-item]
            step_keep = _per_step_keep(keep, n_steps)
            for t in reversed(range(n_steps)):
                h_prev, c_prev, gates, c_raw, tanh_c, m, r = steps[t]
                dh, dc, drs[t] = _call_step(
                    step, _step_backward, dh, dc, d_out[:, t], gates, c_raw, tanh_c, c_prev, r,
                    w_hh_c, w_proj_c, step_keep[t], cell_clip, proj_clip, d_xz[:, t])
            d_w_hh = d_w_proj = None
            if ctx.needs_input_grad[3]:
                h_prevs = torch.stack([s[0] for s in steps], dim=1).flatten(1, 2)  # (D, T*B, P)
                d_w_hh = torch.bmm(d_xz.flatten(1, 2).transpose(1, 2), h_prevs).to(w_hh.dtype)
            if w_proj is not None and ctx.needs_input_grad[4]:
                ms = torch.stack([s[5] for s in steps], dim=1).flatten(1, 2)  # (D, T*B, C)
                d_r = torch.stack(drs, dim=1).flatten(1, 2)  # (D, T*B, P)
                d_w_proj = torch.bmm(d_r.transpose(1, 2), ms).to(w_proj.dtype)
        return (d_xz, dh.to(ctx.state_dtypes[0]), dc.to(ctx.state_dtypes[1]), d_w_hh, d_w_proj,
                None, None, None, None)


def _stack_params(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # One direction: a view, no copy. Two: a copy per call (cheap next to the T steps it serves).
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def _exact_layers(layers: Sequence["LstmWithProjection"], x: torch.Tensor, h0: torch.Tensor,
                  c0: torch.Tensor, keep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D same-shaped layers over time-major inputs x (D, T, B, input_dim) from states
    h0 (D, B, P), c0 (D, B, C). Returns outputs (D, T, B, P) and the final h, c."""
    first = layers[0]
    n_dirs, n_steps, batch_size, input_dim = x.shape
    n_cells = first.cell_dim
    bias = _plus_forget_bias(_stack_params([layer.bias for layer in layers]))
    w_ih = _stack_params([layer.input_weight for layer in layers])
    # All time steps' input projections in one (batched) matrix multiply.
    xz = torch.baddbmm(bias.unsqueeze(1), x.reshape(n_dirs, n_steps * batch_size, input_dim),
                       w_ih.transpose(1, 2))
    xz = xz.view(n_dirs, n_steps, batch_size, 4 * n_cells)
    w_hh = _stack_params([layer.state_weight for layer in layers])
    w_proj = (_stack_params([layer.projection_weight for layer in layers])
              if first.projection_weight is not None else None)
    args = (xz, h0, c0, w_hh, w_proj, keep, first.cell_clip, first.proj_clip, first.compile_mode)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        return _Recurrence.apply(*args)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out, h, c, _ = _run_recurrence(*args, save=False)
    return out, h, c


# --------------------------------------------------------------------------------------
# The layer and the stack
# --------------------------------------------------------------------------------------

class LstmWithProjection(nn.Module):
    """One layer. ``impl``: one of LSTM_IMPLS. ``compile``: torch.compile of the exact path's
    step, one of COMPILE_MODES (``auto``: on CUDA only); the other impls ignore it."""

    def __init__(self, input_dim: int, cell_dim: int, projection_dim: int,
                 cell_clip: Optional[float] = None, proj_clip: Optional[float] = None, impl: str = "exact",
                 compile: str = "auto"):
        super().__init__()
        if impl not in LSTM_IMPLS:
            raise InputError(f"lstm impl must be one of {LSTM_IMPLS}, got {impl!r}")
        if impl == "cudnn" and (cell_clip is not None or proj_clip is not None):
            raise InputError(f"lstm impl 'cudnn' cannot clip (cell_clip={cell_clip}, proj_clip={proj_clip}): "
                             "use impl 'exact', or set both clips to 0/None in the options")
        self.input_dim, self.cell_dim, self.projection_dim = input_dim, cell_dim, projection_dim
        self.cell_clip, self.proj_clip, self.impl = cell_clip, proj_clip, impl
        # Not ``self.compile``: that would hide nn.Module.compile.
        self.compile_mode = _check_compile_mode(compile)
        self.input_weight = nn.Parameter(torch.empty(4 * cell_dim, input_dim))
        self.state_weight = nn.Parameter(torch.empty(4 * cell_dim, projection_dim))
        self.bias = nn.Parameter(torch.empty(4 * cell_dim))
        # bilm-tf writes no projection when projection_dim == cell_dim.
        self.projection_weight = (nn.Parameter(torch.empty(projection_dim, cell_dim))
                                  if projection_dim != cell_dim else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # TF's default for the LSTMCell kernel: glorot uniform over the stacked [x, h] kernel.
        fan_in, fan_out = self.input_dim + self.projection_dim, 4 * self.cell_dim
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(self.input_weight, -bound, bound)
        nn.init.uniform_(self.state_weight, -bound, bound)
        nn.init.zeros_(self.bias)
        if self.projection_weight is not None:
            bound = math.sqrt(6.0 / (self.cell_dim + self.projection_dim))
            nn.init.uniform_(self.projection_weight, -bound, bound)

    def zero_state(self, batch_size: int, like: torch.Tensor) -> State:
        return (like.new_zeros(batch_size, self.projection_dim), like.new_zeros(batch_size, self.cell_dim))

    def _cell(self, z: torch.Tensor, c_prev: torch.Tensor) -> State:
        """The reference step, written as the semantics read (TF's LSTMCell): z (B, 4C) the
        pre-activations, FORGET_BIAS added here in every step."""
        i, j, f, o = z.chunk(4, dim=-1)  # TF's order, spelled out: the exact path's helpers are what this checks
        c = torch.sigmoid(f + FORGET_BIAS) * c_prev + torch.sigmoid(i) * torch.tanh(j)
        c = _clip(c, self.cell_clip)
        h = torch.sigmoid(o) * torch.tanh(c)
        if self.projection_weight is not None:
            h = h @ self.projection_weight.t()
        return _clip(h, self.proj_clip), c

    def forward(self, inputs: torch.Tensor, state: Optional[State] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
        """inputs (B, T, input_dim), mask (B, T) bool or None -> outputs (B, T, projection_dim), final state."""
        batch_size, n_steps, _ = inputs.shape
        h, c = state if state is not None else self.zero_state(batch_size, inputs)
        if n_steps == 0:
            return inputs.new_zeros(batch_size, 0, self.projection_dim), (h, c)
        if self.impl == "exact":
            keep = _keep_mask(mask.unsqueeze(0)) if mask is not None else None
            out, h, c = _exact_layers([self], inputs.transpose(0, 1).unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0), keep)
            return out[0].transpose(0, 1).contiguous(), (h[0], c[0])
        if self.impl == "cudnn":
            return self._cudnn_forward(inputs, (h, c), mask)
        outputs = []
        for t in range(n_steps):  # reference: one plain cell call per step
            z = inputs[:, t] @ self.input_weight.t() + h @ self.state_weight.t() + self.bias
            h_new, c_new = self._cell(z, c)
            if mask is not None:
                keep = mask[:, t].unsqueeze(-1)
                h = torch.where(keep, h_new, h)
                c = torch.where(keep, c_new, c)
                h_new = h_new * keep
            else:
                h, c = h_new, c_new
            outputs.append(h_new)
        return torch.stack(outputs, dim=1), (h, c)

    # ----- cudnn: nn.LSTM fed with our parameters -----
    def _torch_lstm_params(self) -> dict[str, torch.Tensor]:
        """Our parameters in nn.LSTM's layout: gate blocks from GATES order to nn.LSTM's
        (i, f, g=j, o) and the forget bias folded into the bias. Built per call, so gradients
        reach our parameters and the published-format export is unchanged."""
        def reorder(w: torch.Tensor) -> torch.Tensor:
            return _reorder_gates(w, _TORCH_LSTM_GATES)

        bias = _plus_forget_bias(reorder(self.bias), _TORCH_LSTM_GATES)
        params = {"weight_ih_l0": reorder(self.input_weight), "weight_hh_l0": reorder(self.state_weight),
                  "bias_ih_l0": bias, "bias_hh_l0": torch.zeros_like(bias)}
        if self.projection_weight is not None:
            params["weight_hr_l0"] = self.projection_weight
        return params

    def _cudnn_forward(self, inputs: torch.Tensor, state: State, mask: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, State]:
        batch_size, n_steps, _ = inputs.shape
        # A template on the meta device: it holds no memory and no parameters of its own.
        template = nn.LSTM(self.input_dim, self.cell_dim, batch_first=True, device="meta",
                           proj_size=self.projection_dim if self.projection_weight is not None else 0)
        params = self._torch_lstm_params()
        h0, c0 = state
        with warnings.catch_warnings():
            # Per-call weights are never one flat cuDNN buffer, and oneDNN has no projection
            # kernel; both only mean a slower (still correct) path.
            warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
            warnings.filterwarnings("ignore", message=".*not supported with oneDNN.*")
            if mask is None:
                out, (h, c) = functional_call(template, params, (inputs, (h0.unsqueeze(0), c0.unsqueeze(0))))
                return out, (h[0], c[0])
            lengths = mask.sum(dim=1)
            steps = torch.arange(n_steps, device=mask.device)
            if not torch.equal(mask, steps.unsqueeze(0) < lengths.unsqueeze(1)):
                raise InputError("lstm impl 'cudnn' needs right-padded masks (each row True then False)")
            rows = (lengths > 0).nonzero().squeeze(1)  # empty rows: zero outputs, state unchanged
            packed = pack_padded_sequence(inputs[rows], lengths[rows].cpu(), batch_first=True, enforce_sorted=False)
            packed_out, (h, c) = functional_call(template, params, (packed, (h0[rows].unsqueeze(0), c0[rows].unsqueeze(0))))
            out_rows, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=n_steps)
        out = inputs.new_zeros(batch_size, n_steps, self.projection_dim).index_copy(0, rows, out_rows)
        return out, (h0.index_copy(0, rows, h[0]), c0.index_copy(0, rows, c[0]))


def _keep_mask(masks: torch.Tensor) -> Optional[torch.Tensor]:
    """(D, B, T) bool masks -> (D, T, B, 1) time-major, or None when nothing is masked."""
    if bool(masks.all()):
        return None
    return masks.transpose(1, 2).unsqueeze(-1)


class LstmStack(nn.Module):
    """``n_layers`` LSTMs; with skip connections, layer k >= 1 adds its input to its output (bilm-tf's
    ResidualWrapper). ``dropout`` (training only) drops each layer's input, as bilm-tf's DropoutWrapper.
    ``impl`` and ``compile`` as ``LstmWithProjection``'s, for every layer."""

    def __init__(self, input_dim: int, options: LstmOptions, dropout: float = 0.0, impl: str = "exact",
                 compile: str = "auto"):
        super().__init__()
        self.options = options
        self.dropout = dropout
        self.impl = impl
        dims = [input_dim] + [options.projection_dim] * (options.n_layers - 1)
        self.layers = nn.ModuleList(
            LstmWithProjection(d, options.dim, options.projection_dim, options.cell_clip, options.proj_clip, impl,
                               compile)
            for d in dims)

    @property
    def compile_mode(self) -> str:
        return self.layers[0].compile_mode

    def forward(self, inputs: torch.Tensor, state: Optional[list[State]] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], list[State]]:
        """Returns every layer's output (B, T, projection_dim) and the new state of every layer."""
        if self.impl == "exact":
            return run_exact_stacks([self], [inputs], [state], [mask])[0]
        return _run_layers(self, inputs,
                           lambda k, x: self.layers[k](x, state[k] if state is not None else None, mask))


def _run_layers(stack: LstmStack, x: torch.Tensor, run_layer: Callable[[int, torch.Tensor], tuple[torch.Tensor, State]]
                ) -> tuple[list[torch.Tensor], list[State]]:
    """The stack around the layers, for every implementation: layer k's input is dropped out
    (training only), ``run_layer(k, x)`` gives its output and new state, and from the second
    layer on its input is added to its output (skip connections); the output feeds layer k+1.
    x may be any layout ``run_layer`` reads ((B, T, F) for one stack, (D, T, B, F) for D stacks
    in lock step). Returns every layer's output and new state."""
    outputs, new_states = [], []
    for k in range(stack.options.n_layers):
        if stack.dropout > 0.0 and stack.training:
            x = nn.functional.dropout(x, stack.dropout, training=True)
        y, layer_state = run_layer(k, x)
        if stack.options.use_skip_connections and k > 0:
            y = y + x  # zero where masked: both terms are
        outputs.append(y)
        new_states.append(layer_state)
        x = y
    return outputs, new_states


def can_run_together(stacks: Sequence[LstmStack], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``run_exact_stacks`` can advance these stacks in lock step: all exact, same
    architecture, mode, dropout and compile mode, inputs of one shape, dtype and device."""
    first = stacks[0]
    return (all(s.impl == "exact" for s in stacks)
            and all(s.options == first.options and s.dropout == first.dropout and s.training == first.training
                    and s.compile_mode == first.compile_mode
                    and s.layers[0].input_dim == first.layers[0].input_dim for s in stacks)
            and all(x.shape == inputs[0].shape and x.dtype == inputs[0].dtype and x.device == inputs[0].device
                    for x in inputs))


def run_exact_stacks(stacks: Sequence[LstmStack], inputs: Sequence[torch.Tensor],
                     states: Sequence[Optional[list[State]]], masks: Sequence[Optional[torch.Tensor]]
                     ) -> list[tuple[list[torch.Tensor], list[State]]]:
    """Run D exact stacks (e.g. the forward and backward LMs) in lock step: their layers' weights
    are stacked so each time step is one batched matmul for all of them. Each stack gets its own
    inputs (B, T, input_dim), state and mask (B, T) or None; all inputs share one shape
    (``can_run_together``). Returns, per stack, what ``LstmStack.forward`` returns."""
    first = stacks[0]
    options = first.options
    n_dirs = len(stacks)
    batch_size, n_steps, _ = inputs[0].shape
    # Time-major (D, T, B, features) throughout, so each step reads a contiguous slice.
    x = torch.stack(list(inputs)).transpose(1, 2).contiguous()
    keep = None
    if any(m is not None for m in masks):
        full = torch.stack([m if m is not None else torch.ones(batch_size, n_steps, dtype=torch.bool, device=x.device)
                            for m in masks])
        keep = _keep_mask(full)

    def run_layer(k: int, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        layers = [s.layers[k] for s in stacks]
        zero_h, zero_c = layers[0].zero_state(batch_size, x)
        h0 = torch.stack([st[k][0] if st is not None else zero_h for st in states])
        c0 = torch.stack([st[k][1] if st is not None else zero_c for st in states])
        if n_steps == 0:
            return x.new_zeros(n_dirs, 0, batch_size, options.projection_dim), (h0, c0)
        y, h, c = _exact_layers(layers, x, h0, c0, keep)
        return y, (h, c)

    outputs, new_states = _run_layers(first, x, run_layer)
    return [([y[d].transpose(0, 1).contiguous() for y in outputs],
             [(h[d], c[d]) for h, c in new_states])
            for d in range(n_dirs)]
