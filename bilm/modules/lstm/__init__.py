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

``fused`` (default; ``exact`` is its former name, still accepted)
    The fast path with the semantics above. Input projections of all time steps in one
    batched matrix multiply; the recurrence is an autograd Function with a hand-written
    backward (per step only the two recurrent matrix multiplies and the pointwise gate
    math; weight gradients in one matrix multiply over all steps at the end). It runs D
    independent layers in lock step, stacked on a leading dim, so the forward and
    backward LMs advance in one ``bmm`` per step (``run_fused_stacks``). The per-step
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

The package, by job: ``cell`` (the cell defined once: the gate layout, the forget bias, the
clips, the reference step), ``fused`` (the fused path and the cache of compiled steps),
``cudnn`` (nn.LSTM fed with our parameters), ``layer`` (``LstmWithProjection``: one layer, its
parameters, the choice of implementation) and ``stack`` (``LstmStack``: dropout and skip
connections around the layers, for every implementation, and fused stacks in lock step).
"""
from bilm.modules.lstm.cell import FORGET_BIAS, GATES, State
from bilm.modules.lstm.fused import COMPILE_MODES
from bilm.modules.lstm.layer import LSTM_IMPL_ALIASES, LSTM_IMPLS, LstmWithProjection, lstm_impl_name
from bilm.modules.lstm.stack import LstmStack, can_run_together, run_fused_stacks

__all__ = ["COMPILE_MODES", "FORGET_BIAS", "GATES", "LSTM_IMPLS", "LSTM_IMPL_ALIASES", "LstmStack", "LstmWithProjection",
           "State", "can_run_together", "lstm_impl_name", "run_fused_stacks"]
