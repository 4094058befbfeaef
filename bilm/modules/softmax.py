"""The biLM output layer: a softmax over the vocabulary, trained with sampled softmax.

Training follows TensorFlow's ``tf.nn.sampled_softmax_loss`` as bilm-tf called it
(``log_uniform_candidate_sampler``, ``unique=True``, ``remove_accidental_hits=True``,
``num_true=1``): one set of unique candidate ids per step is shared by every
position; the logits of the true and sampled classes have log(expected count)
subtracted; a sampled id equal to a row's true id is hidden from that row.
Evaluation uses the full softmax.

With an 800k-word vocabulary ``weight`` is 400M floats, so the rows used by a step
are gathered with ``F.embedding(sparse=True)``: the gradient then touches only
those rows, and the training side (``bilm.training.gradients``: clipping and all-reduce of
sparse gradients) and ``torch.optim.Adagrad`` keep the step's work proportional to them.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilm.core.errors import InputError


class LogUniformSampler:
    """TensorFlow's log-uniform (Zipfian) candidate sampler over a frequency-sorted vocabulary.

    P(k) = (log(k + 2) - log(k + 1)) / log(V + 1): id 0 (the most frequent word) is
    the most likely. Sampling is "unique": ids are drawn with replacement until
    ``n_unique`` distinct ones are seen, and the number of draws that took
    (``num_tries``) enters the expected counts.
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise InputError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.log_range = math.log(vocab_size + 1)
        # Draws per chunk for each n_unique: a pure function of (n_unique, V), so the
        # generator is advanced identically on every run and after a resume.
        self._chunk_size: dict[int, int] = {}

    def probability(self, ids: Tensor) -> Tensor:
        """P(id) in float64 (log1p(1/(k+1)) is log(k+2) - log(k+1) without cancellation)."""
        return torch.log1p(1.0 / (ids.to(torch.float64) + 1.0)) / self.log_range

    def expected_count(self, ids: Tensor, num_tries: int, n_unique: int | None = None) -> Tensor:
        """How often each id is expected to appear among the ``num_tries`` draws, as float32.

        TF's formula for unique sampling is 1 - (1 - P)^num_tries, computed as
        -expm1(num_tries * log1p(-P)). TF takes a shortcut when no draw was a repeat
        (num_tries == n_unique): P * n_unique. Pass ``n_unique`` to reproduce it.
        """
        p = self.probability(ids)
        if n_unique is not None and num_tries == n_unique:
            return (p * n_unique).float()
        return (-torch.expm1(num_tries * torch.log1p(-p))).float()

    def sample(self, n_unique: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[Tensor, int]:
        """Draw until ``n_unique`` distinct ids are seen.

        Returns ``(candidates, num_tries)``: the distinct ids in the order they were first
        drawn (int64, on the generator's device, or ``device`` when no generator is given),
        and the number of draws it took. Draws happen in chunks through the inverse CDF,
        floor(exp(u * log(V + 1))) - 1, in float64 so the rare end of an 800k vocabulary
        is not coarsened by float32 rounding. The chunk size depends only on
        (n_unique, V), so a given generator state always yields the same sample.
        """
        if not 1 <= n_unique <= self.vocab_size:
            raise InputError(f"n_unique must be in [1, vocab_size={self.vocab_size}], got {n_unique}")
        if generator is not None:
            device = generator.device
        chunk = self._draws_per_chunk(n_unique)
        draws = torch.empty(0, dtype=torch.int64, device=device)
        while True:
            draws = torch.cat([draws, self.draw(chunk, generator, device)])
            first_draw = _first_occurrences(draws)  # sorted positions of each distinct id's first draw
            if first_draw.numel() >= n_unique:
                first_draw = first_draw[:n_unique]
                # TF stops drawing once the n-th distinct id appears.
                return draws[first_draw], int(first_draw[-1]) + 1

    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """``n`` independent draws (with repeats) from P, through the inverse CDF."""
        if generator is not None:
            device = generator.device
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        # u < 1, so the id is <= V - 1 in exact arithmetic; the clamp guards roundoff.
        return (torch.exp(u * self.log_range).floor_().long() - 1).clamp_(0, self.vocab_size - 1)

    def _draws_per_chunk(self, n_unique: int) -> int:
        """A little more than the expected number of draws to see ``n_unique`` distinct ids."""
        if n_unique not in self._chunk_size:
            p = self.probability(torch.arange(self.vocab_size))
            # E[distinct after t draws] = sum_k 1 - (1 - p_k)^t; it only reaches V as t -> inf.
            target = min(float(n_unique), self.vocab_size - 0.5)
            log1m_p = torch.log1p(-p)

            def expected_distinct(t: float) -> float:
                return float((-torch.expm1(t * log1m_p)).sum())

            lo, hi = float(n_unique), float(n_unique)
            while expected_distinct(hi) < target:
                lo, hi = hi, hi * 2
            for _ in range(12):  # to within 0.1%: the chunk only needs to be about right
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if expected_distinct(mid) < target else (lo, mid)
            self._chunk_size[n_unique] = int(math.ceil(hi * 1.1)) + 64
        return self._chunk_size[n_unique]


def _first_occurrences(values: Tensor) -> Tensor:
    """Positions where each distinct value first occurs, in increasing order."""
    distinct, inverse = torch.unique(values, return_inverse=True)
    n_distinct = distinct.numel()
    positions = torch.arange(values.numel(), device=values.device)
    first = torch.full((n_distinct,), values.numel(), dtype=torch.int64, device=values.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return first.sort().values


class SoftmaxLayer(nn.Module):
    """Softmax over the vocabulary: ``weight [V, dim]``, ``bias [V]``, shared by both LM directions.

    ``sparse=True`` makes the gradients of ``weight`` and ``bias`` sparse COO tensors
    holding only the rows a step used (give them to ``torch.optim.Adagrad`` or
    ``torch.optim.SparseAdam``, and to ``bilm.training.gradients``' ``clip_grad_norm_`` and
    ``all_reduce_gradients_``); ``sparse=False`` gives ordinary dense gradients.
    """

    def __init__(self, vocab_size: int, dim: int, sparse: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.sparse = sparse
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.bias = nn.Parameter(torch.empty(vocab_size))
        self.sampler = LogUniformSampler(vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # bilm-tf: W ~ normal(0, 1/sqrt(dim)), b = 0.
        nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(self.dim))
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, dim={self.dim}, sparse={self.sparse}"

    # ----- full softmax (evaluation) -----

    def full_log_probs(self, hidden: Tensor) -> Tensor:
        """Log-probabilities over the whole vocabulary: ``[..., dim] -> [..., V]``, in fp32 even under
        bf16 autocast (bf16 logits would cost perplexity precision over hundreds of thousands of words)."""
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.linear(hidden.float(), self.weight.float(), self.bias.float())
        return torch.log_softmax(logits, dim=-1)

    def full_loss(self, hidden: Tensor, targets: Tensor, mask: Tensor | None = None,
                  max_logits: int = 1 << 26) -> tuple[Tensor, Tensor]:
        """Summed negative log-likelihood of ``targets`` under the full softmax, and the token count.

        ``hidden [..., dim]``, ``targets [...]``, ``mask [...]`` (true where a target counts).
        Rows are processed in chunks of at most ``max_logits`` logits so that a large
        vocabulary does not need an ``[N, V]`` matrix at once.
        """
        hidden, targets, weights = _flatten(hidden, targets, mask)
        nll = -self.target_log_probs(hidden, targets, max_logits)
        return (nll * weights).sum(), weights.sum()

    def target_log_probs(self, hidden: Tensor, targets: Tensor, max_logits: int = 1 << 26) -> Tensor:
        """Log-probability of each row's target under the full softmax: ``hidden [N, dim]``,
        ``targets [N]`` -> ``[N]`` (fp32), in chunks of at most ``max_logits`` logits."""
        rows_per_chunk = max(1, max_logits // self.vocab_size)
        chunks = [self.full_log_probs(hidden[start:start + rows_per_chunk])
                  .gather(1, targets[start:start + rows_per_chunk, None]).squeeze(1)
                  for start in range(0, hidden.shape[0], rows_per_chunk)]
        return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)

    # ----- sampled softmax (training) -----

    def sample_candidates(self, n_samples: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> tuple[Tensor, int]:
        """Unique log-uniform candidates for one step: ``(candidates, num_tries)``."""
        return self.sampler.sample(n_samples, generator, device)

    def sampled_loss(self, hidden: Tensor, targets: Tensor, candidates: Tensor,
                     candidate_expected_counts: Tensor, target_expected_counts: Tensor) -> Tensor:
        """TF ``sampled_softmax_loss`` per position: ``hidden [N, dim]``, ``targets [N]`` -> loss ``[N]``.

        ``candidates [S]`` are shared by all rows; the expected counts come from
        ``LogUniformSampler.expected_count`` with the same ``num_tries``.
        """
        n_rows = targets.shape[0]
        ids = torch.cat([targets, candidates])
        # Gathering through F.embedding gives a sparse gradient with sparse=True.
        rows = F.embedding(ids, self.weight, sparse=self.sparse)
        biases = _gather_sparse_grad(self.bias, ids) if self.sparse else self.bias[ids]
        true_rows, sampled_rows = rows[:n_rows], rows[n_rows:]
        true_bias, sampled_bias = biases[:n_rows], biases[n_rows:]

        # Logits minus log(expected count), in float32 even under bf16 autocast (the
        # logsumexp runs over thousands of classes). Only O(N + S) work besides the matmul
        # and one logsumexp pass over the [N, S] matrix: it is the largest tensor of a step.
        log_q_targets = torch.log(target_expected_counts.float())
        log_q_candidates = torch.log(candidate_expected_counts.float())
        true_logits = (hidden * true_rows).sum(-1).float() + (true_bias.float() - log_q_targets)
        sampled_logits = (hidden @ sampled_rows.t()).float()
        sampled_logits.add_(sampled_bias.float() - log_q_candidates)  # in place: mm saves no output

        # Accidental hits: a candidate equal to the row's true id would count that class twice.
        # As TF, add -FLOAT_MAX to its logit (the sum stays finite). Candidates are unique, so a
        # row has at most one hit: find it by binary search instead of an [N, S] comparison,
        # and add 0 in the rows without one (fixed shapes: no host sync on a GPU).
        sorted_candidates, order = candidates.sort()
        position = torch.searchsorted(sorted_candidates, targets).clamp_(max=candidates.numel() - 1)
        is_hit = sorted_candidates[position] == targets
        penalty = is_hit.to(sampled_logits.dtype)[:, None] * torch.finfo(sampled_logits.dtype).min
        sampled_logits.scatter_add_(1, order[position][:, None], penalty)

        # Softmax cross-entropy with the true class first: log(e^true + sum e^sampled) - true.
        return torch.logaddexp(true_logits, torch.logsumexp(sampled_logits, dim=1)) - true_logits

    def forward(self, hidden: Tensor, targets: Tensor, mask: Tensor | None, n_samples: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Training loss: sample ``n_samples`` candidates, return ``(summed loss, token count)``.

        ``hidden [..., dim]``, ``targets [...]``, ``mask [...]`` (true where a target counts;
        None: all). Same return convention as ``full_loss``: divide to get the mean.
        The generator decides where sampling runs; a CPU generator with GPU ``hidden``
        samples on the CPU and copies the ids over. With ``n_samples >= V`` (a tiny test
        vocabulary) the exact full-softmax loss is returned instead: it is what sampling
        every class approximates, and TF would refuse to draw more unique ids than V.
        """
        if n_samples >= self.vocab_size:
            return self.full_loss(hidden, targets, mask)
        hidden, targets, weights = _flatten(hidden, targets, mask)
        candidates, num_tries = self.sample_candidates(n_samples, generator, device=hidden.device)
        candidates = candidates.to(hidden.device, non_blocking=True)
        candidate_expected = self.sampler.expected_count(candidates, num_tries, n_samples)
        target_expected = self.sampler.expected_count(targets, num_tries, n_samples)
        losses = self.sampled_loss(hidden, targets, candidates, candidate_expected, target_expected)
        return (losses * weights).sum(), weights.sum()


class _GatherWithSparseGrad(torch.autograd.Function):
    """``vector[ids]`` whose gradient is a sparse COO tensor (F.embedding only takes 2-D weights)."""

    @staticmethod
    def forward(ctx, vector: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.size = vector.shape
        return vector.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (ids,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(ids[None], grad, ctx.size, check_invariants=False), None


def _gather_sparse_grad(vector: Tensor, ids: Tensor) -> Tensor:
    return _GatherWithSparseGrad.apply(vector, ids)


def _flatten(hidden: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of ``hidden``, their targets, and float weights (0 where masked out).

    Masked positions are kept (multiplied by 0) rather than dropped: boolean indexing
    would make the shapes data-dependent and force a GPU sync. Their targets are
    replaced by id 0 so padding ids need not be valid.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if mask is None:
        weights = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    else:
        mask = mask.reshape(-1).bool()
        weights = mask.float()
        targets = targets.masked_fill(~mask, 0)
    return hidden, targets, weights
