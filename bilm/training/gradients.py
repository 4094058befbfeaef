"""Gradient clipping and cross-rank averaging that also take sparse gradients.

The softmax of an 800k-word vocabulary gets a sparse gradient (only the rows a step
sampled or targeted); ``torch.nn.utils.clip_grad_norm_`` and DDP handle dense gradients
only. These two helpers are the training side's: model code never calls them.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float,
                    norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sparse gradients.

    Sparse gradients are coalesced first (and stored back coalesced) since repeated
    indices would otherwise be counted as separate entries. For dense-only gradients
    the result equals torch's. Returns the total norm before clipping.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norms = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            norms.append(torch.linalg.vector_norm(p.grad._values(), norm_type))
        else:
            norms.append(torch.linalg.vector_norm(p.grad, norm_type))
    device = params[0].grad.device
    total_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    # Same formula as torch: scale by min(1, max_norm / (norm + 1e-6)) without a host sync.
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in params:
        coef = clip_coef.to(p.grad.device)
        if p.grad.is_sparse:
            p.grad = torch.sparse_coo_tensor(p.grad._indices(), p.grad._values() * coef, p.grad.shape,
                                             is_coalesced=True, check_invariants=False)
        else:
            p.grad.mul_(coef)
    return total_norm


def all_reduce_gradients_(parameters: Iterable[Tensor], group: dist.ProcessGroup | None = None,
                          bucket_mb: float = 25.0) -> None:
    """Average gradients across the ranks of ``group`` in place.

    Dense gradients are flattened into buckets of about ``bucket_mb`` and all-reduced.
    A sparse gradient is coalesced, then every rank's indices and values are gathered
    (sizes first, since ranks touch different numbers of rows; padded to the largest)
    and summed: the traffic is O(rows touched), never O(V * dim).

    Every rank must call this with the same parameters in the same order, each with a
    gradient of the same layout (dense or sparse) on every rank.
    """
    world = dist.get_world_size(group)
    params = [p for p in parameters if p.grad is not None]
    if world == 1:
        return
    dense = [p for p in params if not p.grad.is_sparse]
    sparse = [p for p in params if p.grad.is_sparse]

    bucket_bytes = int(bucket_mb * 2**20)
    for bucket in _buckets(dense, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    for p in sparse:
        p.grad = _all_reduce_sparse(p.grad.coalesce(), world, group)


def _buckets(params: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Group parameters by (device, dtype) into lists of at most ~bucket_bytes of gradient."""
    by_kind: dict[tuple, list[list[Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for p in params:
        kind = (p.grad.device, p.grad.dtype)
        nbytes = p.grad.numel() * p.grad.element_size()
        if kind not in by_kind or sizes[kind] + nbytes > bucket_bytes:
            by_kind.setdefault(kind, []).append([])
            sizes[kind] = 0
        by_kind[kind][-1].append(p)
        sizes[kind] += nbytes
    return [bucket for buckets in by_kind.values() for bucket in buckets if bucket]


def _all_reduce_sparse(grad: Tensor, world: int, group: dist.ProcessGroup | None) -> Tensor:
    indices, values = grad._indices(), grad._values()
    nnz = torch.tensor([values.shape[0]], dtype=torch.int64, device=values.device)
    all_nnz = [torch.zeros_like(nnz) for _ in range(world)]
    dist.all_gather(all_nnz, nnz, group=group)
    counts = [int(n) for n in all_nnz]
    most = max(counts)

    padded_indices = indices.new_zeros((indices.shape[0], most))
    padded_indices[:, :indices.shape[1]] = indices
    padded_values = values.new_zeros((most, *values.shape[1:]))
    padded_values[:values.shape[0]] = values
    gathered_indices = [torch.empty_like(padded_indices) for _ in range(world)]
    gathered_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(gathered_indices, padded_indices, group=group)
    dist.all_gather(gathered_values, padded_values, group=group)

    indices = torch.cat([ix[:, :n] for ix, n in zip(gathered_indices, counts)], dim=1)
    values = torch.cat([v[:n] for v, n in zip(gathered_values, counts)], dim=0) / world
    return torch.sparse_coo_tensor(indices, values, grad.shape, check_invariants=False).coalesce()
