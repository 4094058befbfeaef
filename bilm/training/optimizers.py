"""The optimizer of a run from ``optim.*``: Adagrad (bilm-tf's) or Adam, with the sparse softmax's
rows updated sparsely."""
from __future__ import annotations

import torch
from torch import nn

from bilm.core.errors import InputError
from bilm.runs.config import Config


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adagrad":
        # bilm-tf: Adagrad, lr 0.2, initial accumulator 1.0. It updates only the rows a sparse
        # softmax gradient touched. The softmax gets its own group: torch falls back to its slow
        # per-tensor path for every parameter of a group that holds a sparse gradient. Dense
        # softmax gradients (DeepSpeed) keep one group: ZeRO's flat partitions expect that.
        softmax = list(model.softmax.parameters())
        dense = [p for p in params if all(p is not s for s in softmax)]
        groups = [{"params": dense}, {"params": softmax}] if model.softmax.sparse else [{"params": params}]
        return torch.optim.Adagrad(groups, lr=o.lr,
                                   initial_accumulator_value=o.initial_accumulator_value, weight_decay=o.weight_decay)
    if o.name == "adam":
        sparse = [p for n, p in model.named_parameters() if n.startswith("softmax.") and model.softmax.sparse]
        dense = [p for p in params if all(p is not s for s in sparse)]
        if sparse:
            return _MultiOptimizer([torch.optim.Adam(dense, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps),
                                    torch.optim.SparseAdam(sparse, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps)])
        return torch.optim.Adam(dense, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps,
                                weight_decay=o.weight_decay)
    raise InputError(f"optim.name must be 'adagrad' or 'adam', got {o.name!r}")


class _MultiOptimizer:
    """Adam for dense parameters plus SparseAdam for the sparse softmax, stepped together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        """Per-parameter state of both (the inner dicts are theirs: changing one changes it there)."""
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
