"""The LSTM implementations agree, and the layer has bilm-tf's semantics."""
import os
import random

import pytest
import torch

import bilm.modules.lstm as lstm_module
import bilm.modules.lstm.fused as fused
from bilm.modules.bidirectional import BidirectionalLM
from bilm.core.distributed import DistEnv
from bilm.modules.language_model import LanguageModel
from bilm.modules.lstm import LstmStack, LstmWithProjection
from bilm.core.options import BiLMOptions, LstmOptions
from bilm.training.step import TrainStep
from train_helpers import tiny_config

TOL = dict(atol=1e-5, rtol=1e-5)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(input_dim=5, cell=7, proj=3, cell_clip=None, proj_clip=None, seed=0, impl="fused", std=1.0, compile="auto"):
    torch.manual_seed(seed)
    ref = LstmWithProjection(input_dim, cell, proj, cell_clip, proj_clip, impl="reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, std)  # large weights so the clips are actually hit
    fast = LstmWithProjection(input_dim, cell, proj, cell_clip, proj_clip, impl=impl, compile=compile)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run_with_grads(module, x, state, mask, weights):
    """Forward and backward through a random linear functional of outputs and final state."""
    x = x.clone().requires_grad_(True)
    state = tuple(s.clone().requires_grad_(True) for s in state) if state is not None else None
    out, (h, c) = module(x, state, mask)
    loss = (out * weights[0]).sum() + (h * weights[1]).sum() + (c * weights[2]).sum()
    loss.backward()
    grads = [x.grad] + ([s.grad for s in state] if state is not None else [])
    return [out, h, c, *grads, *[p.grad.clone() for p in module.parameters()]]


def _random_mask(batch, steps, gen):
    """Rows of random lengths (0 included) plus, on one row, holes in the middle."""
    lengths = torch.randint(0, steps + 1, (batch,), generator=gen)
    lengths[0] = steps
    mask = torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)
    if batch > 2 and steps > 2:
        mask[1] = torch.rand(steps, generator=gen) > 0.4
    return mask


@pytest.mark.parametrize("clip", [None, 0.5])
def test_exact_equals_reference(clip):
    ref, fast = _pair(cell_clip=clip, proj_clip=clip)
    x = torch.randn(4, 6, 5)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5, [1] * 6], dtype=torch.bool)
    state = (torch.randn(4, 3), torch.randn(4, 7))
    outs = []
    for layer in (ref, fast):
        x_ = x.clone().requires_grad_(True)
        out, (h, c) = layer(x_, state, mask)
        (out.sum() + h.sum() + c.sum()).backward()
        outs.append((out, h, c, x_.grad, [p.grad.clone() for p in layer.parameters()]))
    (o1, h1, c1, g1, p1), (o2, h2, c2, g2, p2) = outs
    for a, b in zip([o1, h1, c1, g1, *p1], [o2, h2, c2, g2, *p2]):
        torch.testing.assert_close(a, b, **TOL)
    if clip is not None:
        assert c1.abs().max().item() == pytest.approx(clip)  # the clip was hit
        assert o1.abs().max().item() == pytest.approx(clip)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("clip", [None, (0.4, 0.1)])
def test_exact_equals_reference_random_shapes(seed, clip):
    """Outputs, final states and every gradient (inputs, carried states, parameters) agree for
    random shapes, with and without a projection, masks with holes and empty rows, and the
    clips hit."""
    _check_random_shapes(seed, clip)


def _check_random_shapes(seed, clip, compile="auto"):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch, steps, input_dim, cell = rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 6), rng.randint(2, 9)
    proj = cell if seed % 3 == 0 else rng.randint(1, cell - 1)  # seed 0, 3: no projection matrix
    cell_clip, proj_clip = clip or (None, None)
    ref, fast = _pair(input_dim, cell, proj, cell_clip, proj_clip, seed=seed, std=0.8, compile=compile)
    x = torch.randn(batch, steps, input_dim, generator=gen)
    mask = _random_mask(batch, steps, gen) if seed % 2 == 0 else None
    state = (torch.randn(batch, proj, generator=gen), torch.randn(batch, cell, generator=gen)) if seed % 4 != 1 else None
    weights = [torch.randn(batch, steps, proj, generator=gen), torch.randn(batch, proj, generator=gen),
               torch.randn(batch, cell, generator=gen)]
    expected = _run_with_grads(ref, x, state, mask, weights)
    got = _run_with_grads(fast, x, state, mask, weights)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, **TOL)
    if clip is not None:  # the clips were hit: some values sit exactly on the bound
        assert (expected[2].abs() == torch.tensor(cell_clip)).any()
        assert (expected[0].abs() == torch.tensor(proj_clip)).any()


def test_masked_steps_keep_state_and_output_zero():
    for impl in ("reference", "fused"):
        _, layer = _pair(impl=impl)
        x = torch.randn(1, 4, 5)
        out, (h, c) = layer(x, None, torch.tensor([[True, True, False, False]]))
        out2, (h2, c2) = layer(x[:, :2])
        assert (out[:, 2:] == 0).all()
        torch.testing.assert_close(h, h2)
        torch.testing.assert_close(c, c2)
        torch.testing.assert_close(out[:, :2], out2)


@pytest.mark.parametrize("impl", ["reference", "fused", "cudnn"])
def test_forget_bias_is_added_in_the_step(impl):
    layer = LstmWithProjection(1, 1, 1, impl=impl)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    # z = 0: c = sigmoid(0 + 1) * c_prev + sigmoid(0) * tanh(0) = sigmoid(1) * c_prev
    _, (_, c) = layer(torch.zeros(1, 1, 1), (torch.zeros(1, 1), torch.ones(1, 1)))
    assert c.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_zero_steps():
    _, layer = _pair()
    state = (torch.randn(2, 3), torch.randn(2, 7))
    out, (h, c) = layer(torch.randn(2, 0, 5), state)
    assert out.shape == (2, 0, 3)
    assert torch.equal(h, state[0]) and torch.equal(c, state[1])


def _stacks(options, input_dim, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    ref = LstmStack(input_dim, options, dropout, impl="reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.7)
    fast = LstmStack(input_dim, options, dropout, impl="fused")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _stack_outputs_and_grads(stack, x, state, mask):
    x = x.clone().requires_grad_(True)
    state = [tuple(t.clone().requires_grad_(True) for t in layer) for layer in state]
    outs, new_state = stack(x, state, mask)
    torch.manual_seed(1)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss = loss + sum((t * torch.randn_like(t)).sum() for layer in new_state for t in layer)
    loss.backward()
    return ([*outs, *[t for layer in new_state for t in layer], x.grad, *[t.grad for layer in state for t in layer],
             *[p.grad.clone() for p in stack.parameters()]])


@pytest.mark.parametrize("skip", [True, False])
def test_stack_exact_equals_reference(skip):
    options = LstmOptions(dim=6, projection_dim=4, n_layers=3, cell_clip=0.5, proj_clip=0.5, use_skip_connections=skip)
    ref, fast = _stacks(options, input_dim=4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 4, generator=gen)
    mask = _random_mask(3, 5, gen)
    state = [(torch.randn(3, 4, generator=gen), torch.randn(3, 6, generator=gen)) for _ in range(3)]
    for a, b in zip(_stack_outputs_and_grads(ref, x, state, mask), _stack_outputs_and_grads(fast, x, state, mask)):
        torch.testing.assert_close(b, a, **TOL)


def test_stack_dropout_drops_every_layer_input_in_training_only():
    options = LstmOptions(dim=6, projection_dim=4, n_layers=2, cell_clip=None, proj_clip=None, use_skip_connections=True)
    ref, fast = _stacks(options, input_dim=4, dropout=1.0)  # p = 1: every layer sees zeros
    x = torch.randn(2, 3, 4)
    # Each layer sees zeros, and the skip connection adds the dropped (zero) input.
    zeros_out = [layer.eval()(torch.zeros(2, 3, layer.input_dim))[0] for layer in ref.layers]
    for stack in (ref.train(), fast.train()):
        outs, _ = stack(x)
        for a, b in zip(outs, zeros_out):
            torch.testing.assert_close(a, b, **TOL)
    eval_outs, _ = fast.eval()(x)
    assert not torch.allclose(eval_outs[0], zeros_out[0])


def _bilm(lstm_impl, clip=0.5, seed=0, compile="auto"):
    options = BiLMOptions(lstm=LstmOptions(dim=6, projection_dim=4, n_layers=2, cell_clip=clip, proj_clip=clip,
                                           use_skip_connections=True), char_cnn=None, n_tokens_vocab=11)
    torch.manual_seed(seed)
    model = BidirectionalLM(options, lstm_impl=lstm_impl, lstm_compile=compile)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
    return model


def _bilm_run(model, run, fwd, bwd, state, fmask, bmask):
    fwd, bwd = fwd.clone().requires_grad_(True), bwd.clone().requires_grad_(True)
    f_out, b_out, new_state = run(model, fwd, bwd, state, fmask, bmask)
    torch.manual_seed(2)
    loss = sum((o * torch.randn_like(o)).sum() for o in f_out + b_out)
    loss = loss + sum((t * torch.randn_like(t)).sum() for d in ("forward", "backward") for layer in new_state[d] for t in layer)
    loss.backward()
    states = [t for d in ("forward", "backward") for layer in new_state[d] for t in layer]
    return [*f_out, *b_out, *states, fwd.grad, bwd.grad, *[p.grad.clone() for n, p in model.named_parameters() if "lstm" in n]]


def _separately(model, fwd, bwd, state, fmask, bmask):
    state = state or {"forward": None, "backward": None}
    f_out, f_state = model.forward_lstm(fwd, state["forward"], fmask)
    b_out, b_state = model.backward_lstm(bwd, state["backward"], bmask)
    return f_out, b_out, {"forward": f_state, "backward": b_state}


def _together(model, fwd, bwd, state, fmask, bmask):
    return model.run_lstms(fwd, bwd, state, fmask, bmask)


@pytest.mark.parametrize("with_state", [True, False])
def test_run_lstms_equals_the_two_stacks_separately(with_state):
    """The lock-step path of run_lstms (both directions in one bmm per step) equals running the
    stacks one after the other, and the reference implementation, with gradients."""
    _check_run_lstms(with_state)


def _check_run_lstms(with_state, compile="auto"):
    gen = torch.Generator().manual_seed(5)
    fwd, bwd = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    fmask, bmask = _random_mask(3, 5, gen), _random_mask(3, 5, gen)
    state = None
    if with_state:  # the backward direction starts from zeros: states may be given per direction
        state = {"forward": [(torch.randn(3, 4, generator=gen), torch.randn(3, 6, generator=gen)) for _ in range(2)],
                 "backward": None}
    exact, ref = _bilm("fused", compile=compile), _bilm("reference")
    together = _bilm_run(exact, _together, fwd, bwd, state, fmask, bmask)
    exact.zero_grad()
    separately = _bilm_run(exact, _separately, fwd, bwd, state, fmask, bmask)
    reference = _bilm_run(ref, _together, fwd, bwd, state, fmask, bmask)
    assert len(together) == len(separately) == len(reference)
    for a, b, c in zip(together, separately, reference):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(a, c, **TOL)


def test_contextualize_exact_equals_reference():
    tokens = torch.randn(3, 6, 4)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [0] * 6], dtype=torch.bool)
    with torch.no_grad():
        got, _ = _bilm("fused").contextualize(tokens, mask)
        want, _ = _bilm("reference").contextualize(tokens, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


# ----- cudnn (nn.LSTM with proj_size) -----

@pytest.mark.parametrize("proj", [3, 7])  # with and without a projection matrix
@pytest.mark.parametrize("masked", [True, False])
def test_cudnn_equals_reference_without_clips(proj, masked):
    ref, fast = _pair(5, 7, proj, None, None, seed=1, impl="cudnn", std=0.5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [0] * 6, [1] * 5 + [0]], dtype=torch.bool) if masked else None
    state = (torch.randn(4, proj, generator=gen), torch.randn(4, 7, generator=gen))
    weights = [torch.randn(4, 6, proj, generator=gen), torch.randn(4, proj, generator=gen), torch.randn(4, 7, generator=gen)]
    for a, b in zip(_run_with_grads(ref, x, state, mask, weights), _run_with_grads(fast, x, state, mask, weights)):
        torch.testing.assert_close(b, a, **TOL)


def test_cudnn_refuses_clips_and_unpadded_masks():
    with pytest.raises(ValueError, match="cannot clip"):
        LstmWithProjection(5, 7, 3, cell_clip=3.0, impl="cudnn")
    with pytest.raises(ValueError, match="cannot clip"):
        LstmStack(4, LstmOptions(dim=6, projection_dim=4, n_layers=1, cell_clip=None, proj_clip=1.0), impl="cudnn")
    layer = LstmWithProjection(5, 7, 3, impl="cudnn")
    with pytest.raises(ValueError, match="right-padded"):
        layer(torch.randn(1, 3, 5), None, torch.tensor([[True, False, True]]))


def test_impls_share_parameters_and_export():
    names = {impl: list(LstmWithProjection(5, 7, 3, impl=impl).state_dict()) for impl in ("fused", "reference", "cudnn")}
    assert names["fused"] == names["reference"] == names["cudnn"]
    with pytest.raises(ValueError, match="impl"):
        LstmWithProjection(5, 7, 3, impl="fast")


# ----- dtypes and the compile switch -----

def test_exact_under_bf16_autocast_keeps_fp32_cell_state():
    """The autocast path (bf16 matmuls, fp32 gate math and cell state) on CPU: close to fp32,
    fp32 states and parameter gradients."""
    ref, fast = _pair(5, 8, 4, 0.5, 0.5, std=0.5)
    x, mask = torch.randn(3, 6, 5), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6], dtype=torch.bool)
    want, (_, want_c) = ref(x, None, mask)
    x = x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = fast(x, None, mask)
    assert c.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=0)
    torch.testing.assert_close(c, want_c, atol=3e-2, rtol=0)
    (out.float().sum() + c.sum()).backward()
    assert x.grad is not None and all(p.grad.dtype == torch.float32 for p in fast.parameters())


def _counting_compile(monkeypatch):
    """torch.compile replaced by a wrapper that counts calls of the "compiled" step functions
    (and runs them eagerly); a fresh cache of compiled steps."""
    calls = {"_step_forward": 0, "_step_backward": 0}

    def fake_compile(fn, **kwargs):
        def compiled(*args):
            calls[fn.__name__] += 1
            return fn(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(fused, "COMPILED_STEPS", fused.CompiledSteps())  # a fresh cache
    return calls


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "COMPILED_STEPS", fused.CompiledSteps())  # a fresh cache
    ref, fast = _pair(cell_clip=0.5, proj_clip=0.5, compile="on")
    x = torch.randn(2, 4, 5)
    with pytest.warns(RuntimeWarning, match="torch.compile of the LSTM step failed"):
        out, _ = fast(x)
    torch.testing.assert_close(out, ref(x)[0], **TOL)
    assert fused.COMPILED_STEPS.failed
    for cls, args in ((LstmWithProjection, (5, 7, 3)), (LstmStack, (4, LstmOptions(dim=6, projection_dim=4, n_layers=1)))):
        with pytest.raises(ValueError, match="compile mode"):
            cls(*args, compile="sometimes")


def test_compile_is_per_module_not_per_process(monkeypatch):
    """Stacks built with different compile settings in one process each keep their own: the
    "on" stack runs the compiled step (forward and backward), the "off" and "auto" (on a CPU)
    ones the eager step, in any order, and the results agree."""
    calls = _counting_compile(monkeypatch)
    options = LstmOptions(dim=6, projection_dim=4, n_layers=2, cell_clip=0.5, proj_clip=0.5, use_skip_connections=True)
    torch.manual_seed(0)
    stacks = {mode: LstmStack(4, options, compile=mode) for mode in ("on", "off", "auto")}
    stacks["off"].load_state_dict(stacks["on"].state_dict())
    stacks["auto"].load_state_dict(stacks["on"].state_dict())
    x = torch.randn(3, 5, 4)
    outputs = {}
    for mode in ("on", "off", "auto", "on", "off"):
        before = dict(calls)
        outs, _ = stacks[mode](x)
        sum(o.sum() for o in outs).backward()
        outputs[mode] = outs[-1].detach()
        ran_compiled = {name: calls[name] > before[name] for name in calls}
        assert ran_compiled == {"_step_forward": mode == "on", "_step_backward": mode == "on"}, mode
        assert stacks[mode].compile_mode == mode and all(layer.compile_mode == mode for layer in stacks[mode].layers)
    torch.testing.assert_close(outputs["on"], outputs["off"], **TOL)
    torch.testing.assert_close(outputs["auto"], outputs["off"], rtol=0, atol=0)


def test_compile_setting_reaches_the_stacks_from_the_config(monkeypatch):
    """train.lstm_compile -> TrainStep -> LanguageModel -> BidirectionalLM -> both stacks and their
    layers; stacks of different settings do not run in lock step."""
    for mode in ("on", "off"):
        trainer = TrainStep(tiny_config(f"train.lstm_compile={mode}", "train.device=cpu"), 32, DistEnv())
        bilm = trainer.model.bilm
        for stack in (bilm.forward_lstm, bilm.backward_lstm):
            assert stack.compile_mode == mode and all(layer.compile_mode == mode for layer in stack.layers)
    assert LanguageModel(_bilm("fused").options, 11).bilm.forward_lstm.compile_mode == "auto"
    calls = _counting_compile(monkeypatch)
    model = _bilm("fused", compile="on")
    model.backward_lstm = _bilm("fused", compile="off").backward_lstm
    f_out, b_out, _ = model.run_lstms(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert calls["_step_forward"] == 3 * 2  # 3 steps x 2 layers, the forward stack only
    assert not lstm_module.can_run_together([model.forward_lstm, model.backward_lstm], [f_out[0], b_out[0]])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BILM_TEST_COMPILE") != "1", reason="compiling takes ~20 s on CPU; BILM_TEST_COMPILE=1 runs it")
def test_compiled_step_equals_reference(monkeypatch):
    monkeypatch.setattr(fused, "COMPILED_STEPS", fused.CompiledSteps())
    for seed in range(2):
        _check_random_shapes(seed, (0.4, 0.1), compile="on")
    _check_run_lstms(True, compile="on")
    assert not fused.COMPILED_STEPS.failed


# ----- CUDA: the same checks on the GPU -----

@pytest.fixture
def no_tf32():
    # TF32 would make the matmuls, not the implementations, disagree at 1e-5.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("clip", [None, 0.4])
def test_exact_equals_reference_on_cuda(clip, no_tf32):
    for seed in range(3):
        ref, fast = _pair(6, 9, 4, clip, clip, seed=seed, std=0.8)
        ref, fast = ref.cuda(), fast.cuda()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 7, 6, generator=gen).cuda()
        mask = _random_mask(4, 7, gen).cuda()
        state = (torch.randn(4, 4, generator=gen).cuda(), torch.randn(4, 9, generator=gen).cuda())
        weights = [torch.randn(4, 7, 4).cuda(), torch.randn(4, 4).cuda(), torch.randn(4, 9).cuda()]
        for a, b in zip(_run_with_grads(ref, x, state, mask, weights), _run_with_grads(fast, x, state, mask, weights)):
            torch.testing.assert_close(b, a, **TOL)
    exact, reference = _bilm("fused").cuda(), _bilm("reference").cuda()
    fwd, bwd = torch.randn(3, 5, 4).cuda(), torch.randn(3, 5, 4).cuda()
    mask = torch.ones(3, 5, dtype=torch.bool).cuda()
    for a, b in zip(_bilm_run(exact, _together, fwd, bwd, None, mask, mask),
                    _bilm_run(reference, _together, fwd, bwd, None, mask, mask)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.cuda
@needs_cuda
def test_cudnn_and_bf16_autocast_on_cuda(no_tf32):
    ref, fast = _pair(5, 8, 4, None, None, seed=2, impl="cudnn", std=0.5)
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(3, 6, 5).cuda()
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [0] * 6], dtype=torch.bool).cuda()
    torch.testing.assert_close(fast(x, None, mask)[0], ref(x, None, mask)[0], **TOL)
    _, exact = _pair(5, 8, 4, 0.5, 0.5, seed=2, std=0.5)
    exact = exact.cuda()
    want = exact(x, None, mask)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, (h, c) = exact(x, None, mask)
    assert c.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=0)
