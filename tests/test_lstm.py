"""The LSTM implementations agree, and the layer has bilm-tf's semantics."""
import pytest
import torch

from bilm.modules.lstm import LstmWithProjection


def _pair(input_dim=5, cell=7, proj=3, cell_clip=None, proj_clip=None, seed=0):
    torch.manual_seed(seed)
    ref = LstmWithProjection(input_dim, cell, proj, cell_clip, proj_clip, impl="reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 1.0)  # large weights so the clips are actually hit
    fast = LstmWithProjection(input_dim, cell, proj, cell_clip, proj_clip, impl="exact")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


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
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if clip is not None:
        assert c1.abs().max().item() == pytest.approx(clip)  # the clip was hit
        assert o1.abs().max().item() == pytest.approx(clip)


def test_masked_steps_keep_state_and_output_zero():
    ref, _ = _pair()
    x = torch.randn(1, 4, 5)
    out, (h, c) = ref(x, None, torch.tensor([[True, True, False, False]]))
    out2, (h2, c2) = ref(x[:, :2])
    assert (out[:, 2:] == 0).all()
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(c, c2)
    torch.testing.assert_close(out[:, :2], out2)


def test_forget_bias_is_added_in_the_step():
    layer = LstmWithProjection(1, 1, 1, impl="reference")
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    # z = 0: c = sigmoid(0 + 1) * c_prev + sigmoid(0) * tanh(0) = sigmoid(1) * c_prev
    _, (_, c) = layer(torch.zeros(1, 1, 1), (torch.zeros(1, 1), torch.ones(1, 1)))
    assert c.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
