"""Process-group setup for torchrun (env:// rendezvous): NCCL on GPU, gloo on CPU.

Kept out of the model code: the trainer and evaluator ask this module who they are.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bilm.core.errors import InputError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group when
    there is more than one process. ``device``: auto (cuda when present), cpu, cuda."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but no CUDA GPU is visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        store = _restart_safe_store(world_size, timeout)
        if store is not None:
            dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), store=store, rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method="env://", timeout=timeout)
    return DistEnv(rank, world_size, local_rank, dev)


def init_single_process_group(device: torch.device) -> None:
    """A one-member process group on a free local port, unless a group exists: DeepSpeed wants one
    even in a single process outside torchrun (else it looks for MPI)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    for key in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(key, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=0, world_size=1)


def _restart_safe_store(world_size: int, timeout: datetime.timedelta):
    """The store of torchrun's agent, with keys private to this restart attempt, or None.

    torchrun keeps one TCP store for all restart attempts of a job (its agent store) and the
    workers' ``env://`` process group writes the same keys in every attempt: after a rank dies
    and the group restarts, a rank can read the dead attempt's address of a peer and fail with
    "Gloo connectFullMesh failed ... Connection refused". Prefixing the keys with the attempt
    number (``TORCHELASTIC_RESTART_COUNT``) keeps attempts apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"bilm/attempt_{attempt}", store)


def to_device(batch, device: torch.device):
    """A batch (tensors, nested in dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def shutdown(barrier: bool = True) -> None:
    """Leave the process group; ``barrier=False`` on an error path, where the other ranks may
    never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats across ranks (float64 on CPU for gloo, on the device for NCCL)."""
    if not env.distributed:
        return values
    device = env.device if env.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed:
        return values
    device = env.device if env.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
