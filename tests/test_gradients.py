"""bilm.training.gradients: clipping and cross-rank averaging of dense and sparse gradients."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilm.training.gradients import all_reduce_gradients_, clip_grad_norm_


def grads_with_duplicates():
    """A dense param and a sparse param whose gradient repeats row 1 (uncoalesced)."""
    dense = torch.nn.Parameter(torch.zeros(3, 4))
    dense.grad = torch.randn(3, 4)
    sparse = torch.nn.Parameter(torch.zeros(10, 4))
    sparse.grad = torch.sparse_coo_tensor(torch.tensor([[1, 5, 1, 7]]), torch.randn(4, 4) * 3, (10, 4))
    return dense, sparse


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_sparse_equals_dense(max_norm):
    dense, sparse = grads_with_duplicates()
    copies = [torch.nn.Parameter(torch.zeros_like(p)) for p in (dense, sparse)]
    copies[0].grad = dense.grad.clone()
    copies[1].grad = sparse.grad.to_dense()
    norm = clip_grad_norm_([dense, sparse], max_norm)
    want = torch.nn.utils.clip_grad_norm_(copies, max_norm)
    torch.testing.assert_close(norm, want)
    torch.testing.assert_close(dense.grad, copies[0].grad)
    assert sparse.grad.is_sparse
    torch.testing.assert_close(sparse.grad.to_dense(), copies[1].grad)


def test_clip_grad_norm_dense_only_equals_torch():
    params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
    copies = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    for p, c in zip(params, copies):
        p.grad = torch.randn_like(p) * 4
        c.grad = p.grad.clone()
    torch.testing.assert_close(clip_grad_norm_(params, 1.0), torch.nn.utils.clip_grad_norm_(copies, 1.0))
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.grad, c.grad)


def rank_grads(rank: int) -> list[torch.nn.Parameter]:
    """Rank-dependent gradients; the sparse one touches a different number of rows per rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    small = torch.nn.Parameter(torch.zeros(3, 2))
    small.grad = torch.randn(3, 2, generator=generator)
    big = torch.nn.Parameter(torch.zeros(64, 8))
    big.grad = torch.randn(64, 8, generator=generator)
    embedding = torch.nn.Parameter(torch.zeros(20, 4))
    rows = torch.tensor([[2, 9, 2], [9, 11, 15, 11, 0]][rank])
    embedding.grad = torch.sparse_coo_tensor(rows[None], torch.randn(len(rows), 4, generator=generator), (20, 4))
    vector = torch.nn.Parameter(torch.zeros(20))
    vector.grad = torch.sparse_coo_tensor(rows[None], torch.randn(len(rows), generator=generator), (20,))
    return [small, big, embedding, vector]


def all_reduce_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        params = rank_grads(rank)
        # A tiny bucket so the dense params go in separate buckets.
        all_reduce_gradients_(params, bucket_mb=64 * 8 * 4 / 2**20)
        torch.save([p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params]
                   + [torch.tensor([p.grad.is_sparse for p in params])],
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_gradients_averages_dense_and_sparse(tmp_path):
    world = 2
    mp.spawn(all_reduce_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    per_rank = [rank_grads(rank) for rank in range(world)]
    want = [sum((ps[i].grad.to_dense() if ps[i].grad.is_sparse else ps[i].grad) for ps in per_rank) / world
            for i in range(4)]
    for rank in range(world):
        *got, is_sparse = torch.load(tmp_path / f"rank{rank}.pt")
        assert is_sparse.tolist() == [False, False, True, True]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
