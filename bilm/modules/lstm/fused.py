"""The fused path (``lstm_impl: fused``, formerly ``exact``): the cell's semantics, fast.

Input projections of all time steps in one batched matrix multiply; the recurrence is an
autograd Function with a hand-written backward (per step only the two recurrent matrix
multiplies and the pointwise gate math; weight gradients in one matrix multiply over all steps
at the end). It runs D independent layers in lock step, stacked on a leading dim, so the
forward and backward LMs advance in one ``bmm`` per step (``bilm.modules.lstm.stack``). The
per-step pointwise math can be fused with ``torch.compile`` (``COMPILE_MODES``; the cache of
compiled steps is ``COMPILED_STEPS``). Gate math and the cell state are fp32 even under bf16 autocast.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from bilm.core.errors import InputError
from bilm.modules.lstm.cell import GATE_POSITIONS, clip, clip_grad, gate_block, plus_forget_bias, split_gates


# --------------------------------------------------------------------------------------
# The fused path: one step forward and backward, for D layers stacked on dim 0.
#
# Shapes: B batch, C cells, P projection (P == C and no projection matrix when the layer
# has none). ``keep`` is (D, B, 1) bool or None (no masking). Gate math runs in fp32; the
# matrix multiplies run in the dtype of the precomputed input part (bf16 under autocast).
# --------------------------------------------------------------------------------------

def _tanh(x: torch.Tensor, via_sigmoid: bool) -> torch.Tensor:
    """tanh(x). ``via_sigmoid``: as 2 sigmoid(2x) - 1, for CPU, where ATen's tanh is much slower
    than its sigmoid; the identity is within float32 rounding of tanh (docs/measurements.md, "lstm-tanh")."""
    if not via_sigmoid:
        return torch.tanh(x)
    return torch.mul(x, 2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _activate_gates_(gates: torch.Tensor, tanh_via_sigmoid: bool) -> None:
    """The gate nonlinearities in place on the pre-activations (..., 4C): tanh on j, sigmoid on
    the others (f's FORGET_BIAS is already in the bias, see ``plus_forget_bias``)."""
    j = gate_block(gates, "j")
    if tanh_via_sigmoid:  # one sigmoid over all four blocks, j's doubled first: tanh(z) = 2 sigmoid(2z) - 1
        j.mul_(2.0)
        gates.sigmoid_()
        j.mul_(2.0).sub_(1.0)
    else:  # the blocks before j, j, the blocks after j
        n_cells, k = j.shape[-1], GATE_POSITIONS[1]
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
    i, j, f, o = split_gates(gates)
    c_raw = torch.addcmul(f * c, i, j)
    c_new = clip(c_raw, cell_clip)
    tanh_c = _tanh(c_new, tanh_via_sigmoid)
    m = (o * tanh_c).to(xz_t.dtype)
    r = torch.bmm(m, w_proj_t) if w_proj_t is not None else m
    h_new = clip(r.float(), proj_clip)
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
    dr = clip_grad(dh_new, r, proj_clip).to(dtype)
    dm = (torch.bmm(dr, w_proj) if w_proj is not None else dr).float()
    i, j, f, o = split_gates(gates)
    dc_new = torch.addcmul(dc, dm * o, 1.0 - tanh_c * tanh_c)
    dc_raw = clip_grad(dc_new, c_raw, cell_clip)
    # Gradient of each gate's activation output, then times the activation's derivative:
    # s (1 - s) for the sigmoids i, f, o and 1 - j^2 for tanh.
    # Written in place (no cat); in fp32 first when dz is bf16, rounded once at the end.
    dz32 = dz if dz.dtype == torch.float32 else torch.empty_like(gates)
    dz_i, dz_j, dz_f, dz_o = split_gates(dz32)
    torch.mul(dc_raw, j, out=dz_i)
    torch.mul(dc_raw, i, out=dz_j)
    torch.mul(dc_raw, c_prev, out=dz_f)
    torch.mul(dm, tanh_c, out=dz_o)
    d_act = torch.addcmul(gates, gates, gates, value=-1.0)
    torch.addcmul(torch.ones_like(j), j, j, value=-1.0, out=gate_block(d_act, "j"))
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
# CUDA tensors only: on a CPU compiling did not pay for itself, docs/measurements.md,
# "lstm-compile"). What is process-wide is only a cache (``CompiledSteps``): the
# compiled functions (PyTorch also caches kernels, in memory and on disk by Inductor), and
# that compiling failed once: then the eager step is used from then on, with a warning.
# --------------------------------------------------------------------------------------

COMPILE_MODES = ("auto", "on", "off")


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InputError(f"lstm compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return mode


class CompiledSteps:
    """The process-wide cache of the compiled step functions, and whether compiling failed once
    (then the eager step is used from then on, with a warning). ``COMPILED_STEPS`` is the one
    instance; tests replace it for a fresh cache."""

    def __init__(self):
        self.functions: dict[str, Callable] = {}
        self.failed = False

    def step_functions(self, compile_mode: str, device: torch.device) -> tuple[Callable, Callable]:
        use = compile_mode == "on" or (compile_mode == "auto" and device.type == "cuda")
        if not use or self.failed or not hasattr(torch, "compile"):
            return _step_forward, _step_backward
        if not self.functions:
            self.functions["forward"] = torch.compile(_step_forward, dynamic=False)
            self.functions["backward"] = torch.compile(_step_backward, dynamic=False)
        return self.functions["forward"], self.functions["backward"]

    def call(self, fn: Callable, eager: Callable, *args):
        """Call a (possibly compiled) step; a failed compile falls back to eager for good."""
        if fn is eager:
            return eager(*args)
        try:
            return fn(*args)
        except Exception as e:  # compile errors surface at the first call (no compiler, no triton, ...)
            self.failed = True
            warnings.warn(f"torch.compile of the LSTM step failed ({type(e).__name__}: {e}); "
                          "using the eager step", RuntimeWarning)
            return eager(*args)


COMPILED_STEPS = CompiledSteps()


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
    step, _ = COMPILED_STEPS.step_functions(compile_mode, xz.device)
    # The sigmoid form of tanh pays on CPU, in eager mode (a compiled step fuses tanh itself).
    tanh_via_sigmoid = xz.device.type == "cpu" and step is _step_forward
    step_keep = _per_step_keep(keep, xz.shape[1])
    outputs, saved = [], []
    for t in range(xz.shape[1]):
        out, h_next, c_next, gates, c_raw, tanh_c, m, r = COMPILED_STEPS.call(
            step, _step_forward, xz[:, t], h, c, w_hh_t, w_proj_t, step_keep[t], cell_clip, proj_clip,
            tanh_via_sigmoid)
        if save:
            saved.append((h, c, gates, c_raw, tanh_c, m, r))
        outputs.append(out.to(dtype))
        h, c = h_next, c_next
    # Clones: the final state may be a saved tensor (r, c_raw), and outputs must not alias those.
    return torch.stack(outputs, dim=1), h.float().clone(), c.clone(), saved


class _Recurrence(torch.autograd.Function):
    """The recurrence of the fused path, with a hand-written backward: per step only the two
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
            _, step = COMPILED_STEPS.step_functions(ctx.compile_mode, d_out.device)
            # Undefined (None) output gradients are zeros.
            dh = d_h.float() if d_h is not None else d_out.new_zeros(n_dirs, batch_size, w_hh.shape[-1], dtype=torch.float32)
            dc = d_c.float() if d_c is not None else torch.zeros_like(steps[0][1])
            d_xz = d_out.new_empty(n_dirs, n_steps, batch_size, w_hh.shape[1], dtype=dtype)  # (D, T, B, 4C)
            drs: list[torch.Tensor] = [None] * n_steps  # type: ignore[list-item]
            step_keep = _per_step_keep(keep, n_steps)
            for t in reversed(range(n_steps)):
                h_prev, c_prev, gates, c_raw, tanh_c, m, r = steps[t]
                dh, dc, drs[t] = COMPILED_STEPS.call(
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


def fused_layers(layers: Sequence[nn.Module], x: torch.Tensor, h0: torch.Tensor,
                  c0: torch.Tensor, keep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D same-shaped layers over time-major inputs x (D, T, B, input_dim) from states
    h0 (D, B, P), c0 (D, B, C). Returns outputs (D, T, B, P) and the final h, c."""
    first = layers[0]
    n_dirs, n_steps, batch_size, input_dim = x.shape
    n_cells = first.cell_dim
    bias = plus_forget_bias(_stack_params([layer.bias for layer in layers]))
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



def keep_mask(masks: torch.Tensor) -> Optional[torch.Tensor]:
    """(D, B, T) bool masks -> (D, T, B, 1) time-major, or None when nothing is masked."""
    if bool(masks.all()):
        return None
    return masks.transpose(1, 2).unsqueeze(-1)

