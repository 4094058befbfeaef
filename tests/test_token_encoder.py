"""The char CNN encodes each distinct token of a large batch once; results and gradients are
those of encoding every position. In float64, so that the only difference float32 shows
(the gradient summed per distinct token first, then over tokens: another summation order)
cannot hide a real one."""
import torch

from bilm.core.chars import CharIdMapper
from bilm.modules.token_encoder import CharCNNEncoder
from bilm.core.options import CharCNNOptions


def test_distinct_token_path_equals_every_position():
    torch.manual_seed(0)
    encoder = CharCNNEncoder(CharCNNOptions(embedding_dim=4, filters=[[1, 4], [2, 8]], n_highway=1), output_dim=6).double()
    words = ["the", "cat", "sat", "on", "a", "mat", "é中", "the", "the", "."]
    mapper = CharIdMapper(50)
    char_ids = torch.from_numpy(mapper.batch([words * 4] * 10))  # 10 x 42 = 420 positions, 9 distinct tokens
    assert char_ids.shape[0] * char_ids.shape[1] > 256  # large enough for the distinct-token path
    deduplicated = encoder(char_ids)
    deduplicated.pow(2).sum().backward()
    grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    every_position = encoder.encode_distinct(char_ids.reshape(-1, 50)).reshape(deduplicated.shape)
    every_position.pow(2).sum().backward()
    torch.testing.assert_close(deduplicated, every_position, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, (p.grad for p in encoder.parameters())):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
