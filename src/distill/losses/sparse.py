"""Distillation against sparse teacher targets: the teacher's top-k tokens plus the mass it left over.

Storing a teacher's full distribution for every training token costs V floats per token (150k for Qwen-size
vocabularies), so offline distillation stores a few entries per token instead (Sparse logit sampling, Anshumann
et al. 2025, discusses the trade-offs; top-k with a "rest" bucket is the simplest unbiased-at-the-bucket-level
choice). `SparseTargets` holds, for each of N tokens:

- ``ids``       (N, k) int64  token ids; a slot with id -1 is unused padding.
- ``log_probs`` (N, k) float  the teacher's log-probabilities of those ids at temperature 1; -inf also marks
                              an unused slot.
- ``log_rest``  (N,)   float  log of the teacher's remaining probability mass, log(1 − Σ top-k probs); -inf when
                              the k ids hold all of it.
- ``distinct``  bool          a promise that no id appears in two used slots of a row (true of top-k targets and
                              of the cache's merged samples). Without it the same id may repeat (its probabilities
                              add up) and the loss first merges repeats, which costs an (N, k, k) comparison.
- ``tail``      str           how the rest mass enters the divergence, see below: "bucket" or "uniform".
- ``log_rest_half`` (N,) float or None  log Σ √p over the tokens outside the ids: the tail's mass at
                              temperature 2 before normalizing, which lets τ ≠ 1 get the tail's tempered mass
                              right instead of assuming the tail is flat (see below).
- ``draw_log_probs`` (N, k) float or None  for sampled entries (a cache's draws): the teacher's log-probability
                              of each id at temperature 1, while ``log_probs`` holds the draws' estimate at τ = 1
                              (log count/m, times the rest for tail draws). The estimate at τ is the importance
                              reweighting log_probs + (1/τ − 1)·draw_log_probs, formed here at loss time; an exact
                              entry has draw_log_probs = log_probs (that sum is then log_probs / τ). None: every
                              entry is exact.

The teacher at temperature τ, applied here (targets always hold τ = 1 values). The id buckets are log p_i / τ
(sampled entries: their estimate reweighted by p_i^(1/τ − 1)) and the tail bucket is f(1/τ), where
f(α) = log Σ_tail p_j^α; the k'+1 values are renormalized. f(1) = log_rest is stored, so τ = 1 is exact. For
τ ≠ 1, f is convex in α with f(0) = log(V − k') (k' = number of distinct used ids; every other token counted):

- without ``log_rest_half`` the tail is assumed flat, f(α) = log(V − k') + α·(log_rest − log(V − k')), the chord
  from f(0) to f(1); by convexity this overstates the tail's tempered mass for τ > 1, which at τ = 2, k = 32
  left the loss 20–30% below the online one on a peaked teacher;
- with ``log_rest_half`` = f(½), f is the parabola through f(0), f(½), f(1) for 1/τ ≤ 1: exact at τ = 2 (and
  τ → ∞), convex, and never above the chord; for τ < 1 the secant through f(½), f(1) is extended.

How the tail enters the divergence (`tail`):

- ``bucket``   both distributions are coarse-grained to the same k'+1 outcomes (each used id, and "any other
               token"); the divergence is `losses.divergence_from_log_probs` between them. The student's tail is
               the logsumexp of its log-probabilities over all other tokens. Coarse-graining can only lower an
               f-divergence (data processing), so at τ = 1 this is a lower bound of the dense value: nothing is
               said about the shape of the student's tail.
- ``uniform``  the teacher is taken as a full distribution over the vocabulary, its tail mass spread evenly over
               the other tokens, and the divergence is the dense one against that. It adds, for forward KL,
               tail mass × KL(uniform ‖ student's normalized tail): the student's tail is pulled toward flat
               instead of being left alone, which is what a tempered (flatter) teacher's tail looks like.

A third way needs no rule: draws from the tail stored next to the top-k (`distill.cache.reader.with_tail_samples`,
``cache.tail_samples``) become extra ids with estimated probabilities, and log_rest is -inf.

Both rules are exact (equal the dense divergence) when k = V − 1, and when the teacher has exactly k non-zero tokens
for every divergence that stays finite there (all but reverse_kl, jsd with β = 1 and skew_reverse_kl with
α = 0). Values are times τ² as in `losses.token_divergence`.

Forward KL (`Objective.is_forward_kl`: jsd β = 0 and skew_forward_kl α = 0 too) has a closed-form gradient,
τ·(p_student − q) with q the teacher's (bucket: per-token) target, so it skips autograd through the (N, V)
softmax; the other divergences go through autograd. Its (N, V) work is one log-softmax whose buffer becomes the
probabilities and then, in place, the gradient; `sparse_forward_kl_chunk` (used by `distill.losses.fused`) also reads
the cross-entropy off that same log-softmax and folds its gradient into the same pass, with no autograd at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from distill.losses.dense import IGNORE_INDEX, LOG_PROB_FLOOR, divergence_from_log_probs, log_probs, token_cross_entropy
from distill.losses.objective import Objective

TAILS = ("bucket", "uniform")
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SparseTargets:
    """Top-k teacher targets for N tokens; see the module docstring for the meaning of each field."""

    ids: torch.Tensor  # (N, k) int64, -1 = unused slot
    log_probs: torch.Tensor  # (N, k) float, temperature 1, -inf = unused slot
    log_rest: torch.Tensor  # (N,) float, log of the mass outside the ids
    distinct: bool = False  # no id repeats among a row's used slots
    tail: str = "bucket"  # how the rest mass enters the divergence: "bucket" | "uniform"
    log_rest_half: torch.Tensor | None = None  # (N,) log Σ_tail √p, for τ ≠ 1
    draw_log_probs: torch.Tensor | None = None  # (N, k) τ = 1 log-probs of sampled entries; None = all exact

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.shape != self.log_probs.shape or self.log_rest.shape != self.ids.shape[:1]:
            raise ValueError(
                f"sparse targets need ids (N, k), log_probs (N, k), log_rest (N,); got {tuple(self.ids.shape)}, "
                f"{tuple(self.log_probs.shape)}, {tuple(self.log_rest.shape)}"
            )
        if self.log_rest_half is not None and self.log_rest_half.shape != self.log_rest.shape:
            raise ValueError(f"log_rest_half needs shape {tuple(self.log_rest.shape)}")
        if self.draw_log_probs is not None and self.draw_log_probs.shape != self.ids.shape:
            raise ValueError(f"draw_log_probs needs shape {tuple(self.ids.shape)}")
        if self.tail not in TAILS:
            raise ValueError(f"unknown tail treatment {self.tail!r}; choose one of {', '.join(TAILS)}")

    def __len__(self) -> int:
        return self.ids.shape[0]

    def _map(self, rows) -> SparseTargets:
        """The same targets with `rows` applied to every per-token tensor."""
        half = rows(self.log_rest_half) if self.log_rest_half is not None else None
        draws = rows(self.draw_log_probs) if self.draw_log_probs is not None else None
        return dataclasses.replace(
            self,
            ids=rows(self.ids),
            log_probs=rows(self.log_probs),
            log_rest=rows(self.log_rest),
            log_rest_half=half,
            draw_log_probs=draws,
        )

    def select(self, index: torch.Tensor) -> SparseTargets:
        """The targets of the tokens at `index` (a 1-D long tensor of row numbers)."""
        return self._map(lambda t: t.index_select(0, index))

    def to(self, device: torch.device | str) -> SparseTargets:
        return self._map(lambda t: t.to(device))

    @torch.no_grad()
    def merged(self) -> SparseTargets:
        """The same targets with repeated ids merged into their first slot (probabilities added), unused slots
        as id -1 / -inf, and `distinct` set. A no-op when `distinct` is already set."""
        if self.distinct:
            return self
        if self.draw_log_probs is not None:  # sample estimates cannot be added like probabilities
            raise ValueError("sampled targets (draw_log_probs) must be distinct")
        ids, lp = self.ids, self.log_probs.float()
        used = (ids >= 0) & (lp > _NEG_INF)  # (n, k)
        same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & used.unsqueeze(-1) & used.unsqueeze(-2)  # (n, k, k)
        first = used & ~same.tril(-1).any(-1)  # (n, k): no earlier slot holds the same id
        total = torch.where(same, lp.unsqueeze(-2), _NEG_INF).logsumexp(-1)  # (n, k): log Σ p over equal ids
        return dataclasses.replace(
            self, ids=torch.where(first, ids, -1), log_probs=torch.where(first, total, _NEG_INF), distinct=True
        )


@torch.no_grad()
def top_k_targets(teacher_logits: torch.Tensor, k: int, vocab_size: int | None = None) -> SparseTargets:
    """The k most probable tokens of each row of `teacher_logits` at temperature 1. (N, V) -> SparseTargets.

    Columns at or beyond `vocab_size` (padding rows of an embedding matrix) are dropped first. The rest mass
    is a logsumexp over the tokens not kept, not 1 − Σ top-k, so it does not lose precision to cancellation.
    """
    logits = teacher_logits[..., :vocab_size] if vocab_size is not None else teacher_logits
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    top_lp, top_ids = lp.topk(k, dim=-1)  # (N, k), (N, k)
    tail = lp.scatter(-1, top_ids, _NEG_INF)  # (N, V) the others' log-probs
    return SparseTargets(top_ids, top_lp, tail.logsumexp(-1), distinct=True, log_rest_half=tail_half_mass(tail))


def tail_half_mass(tail_log_probs: torch.Tensor) -> torch.Tensor:
    """log Σ √p over a row's tail tokens, given their log-probs (-inf elsewhere). (N, V) -> (N,)."""
    return (0.5 * tail_log_probs).logsumexp(-1)


def _tempered_tail(
    log_rest: torch.Tensor, log_rest_half: torch.Tensor | None, log_others: torch.Tensor, temperature: float
) -> torch.Tensor:
    """f(1/τ) = log Σ_tail p^(1/τ), estimated as described in the module docstring. (N,) -> (N,)."""
    alpha = 1.0 / temperature
    if log_rest_half is None:
        return log_others + alpha * (log_rest - log_others)  # flat tail: the chord from f(0) to f(1)
    f0, fh, f1 = log_others, log_rest_half.float(), log_rest
    if alpha <= 1.0:
        return f0 + alpha * (4.0 * fh - 3.0 * f0 - f1) + alpha * alpha * 2.0 * (f0 + f1 - 2.0 * fh)
    return f1 + (alpha - 1.0) * 2.0 * (f1 - fh)  # τ < 1: the secant through f(½), f(1), extended


def _teacher_buckets(
    targets: SparseTargets, temperature: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher's coarse log-distribution at τ over (ids, tail) of distinct targets.

    Returns (n, k+1) floored float32 log-probabilities, the (n, k) mask of used slots (an unused slot has a
    floored, zero-probability bucket) and the (n,) number of tokens outside the ids.
    """
    lp = targets.log_probs.float()  # (n, k)
    used = (targets.ids >= 0) & (lp > _NEG_INF)  # (n, k)
    if temperature == 1.0:
        tempered = lp  # sample estimates and exact entries alike are the τ = 1 values
    elif targets.draw_log_probs is None:
        tempered = lp / temperature
    else:  # importance weights of draws at τ: estimate · p^(1/τ − 1) (exact entries: p^(1/τ))
        tempered = lp + (1.0 / temperature - 1.0) * targets.draw_log_probs.float()
    id_buckets = torch.where(used, tempered, _NEG_INF)  # (n, k)
    others = vocab_size - used.sum(-1)  # (n,) tokens outside the ids
    log_rest = targets.log_rest.float()  # (n,)
    if temperature == 1.0:
        tail = log_rest  # exact; skips a log(V−k') that would only add rounding
    else:
        log_others = others.clamp_min(1).float().log()  # (n,)
        tail = _tempered_tail(log_rest, targets.log_rest_half, log_others, temperature)
    # No tokens outside the ids, or no mass there (-inf - -inf would be NaN in the formulas above).
    tail = torch.where((others > 0) & (log_rest > _NEG_INF), tail, _NEG_INF)  # (n,)
    buckets = torch.cat([id_buckets, tail.unsqueeze(-1)], dim=-1)  # (n, k+1)
    # Floor before normalizing so that a row with no information at all (every slot unused, no rest) gives a
    # finite, if meaningless, distribution instead of NaN; such rows are expected to be masked out by labels.
    buckets = torch.log_softmax(buckets.clamp_min(LOG_PROB_FLOOR), dim=-1)
    return buckets.clamp_min(LOG_PROB_FLOOR), used, others


def _in_ids(shape: torch.Size, ids: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(N, V) bool: the columns named by a used slot. Counting with scatter_add (not a boolean scatter) stays
    deterministic when an unused slot and a used one point at the same column."""
    hits = torch.zeros(shape, dtype=torch.float32, device=ids.device).scatter_add_(-1, ids, used.float())
    return hits > 0


def _dense_teacher(
    teacher: torch.Tensor, ids: torch.Tensor, used: torch.Tensor, in_ids: torch.Tensor, others: torch.Tensor
) -> torch.Tensor:
    """The `uniform`-tail teacher over the whole vocabulary: (N, V) floored log-probs from its (N, k+1) buckets."""
    per_other = teacher[:, -1] - others.clamp_min(1).float().log()  # (N,) each tail token's share
    at_ids = torch.zeros(in_ids.shape, dtype=torch.float32, device=ids.device)
    at_ids.scatter_add_(-1, ids, torch.where(used, teacher[:, :-1].exp(), 0.0))  # (N, V) probabilities at the ids
    dense = torch.where(in_ids, at_ids.log(), per_other.unsqueeze(-1))  # (N, V)
    return dense.clamp_min(LOG_PROB_FLOOR)


def _forward_kl_in_place(
    s: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, used: torch.Tensor, others: torch.Tensor, uniform: bool
) -> tuple[torch.Tensor, tuple]:
    """Per-token KL(teacher ‖ student) (not yet times τ²) from the student's log-probs `s` (N, V) at τ, which are
    turned in place into the student's probabilities p: one (N, V) buffer serves both, and the caller may read
    other columns of `s` (the cross-entropy's label) before calling. Returns (kl (N,), state for
    `_forward_kl_grad_in_place`); state[0] is p.

    teacher (N, k+1) floored log-probs at τ; ids (N, k) in range; used (N, k) bool; others (N,).
    """
    # Unused slots point at the row's first used id, so that every scatter/gather on a column carries the
    # same value (deterministic); a row without used slots leaves p as it is.
    any_used = used.any(-1, keepdim=True)  # (N, 1)
    first_used = ids.gather(-1, used.int().argmax(-1, keepdim=True))  # (N, 1)
    target_cols = torch.where(used, ids, first_used)  # (N, k)
    s_ids = torch.where(used, s.gather(-1, ids).clamp_min(LOG_PROB_FLOOR), LOG_PROB_FLOOR)  # (N, k)
    all_sum = None
    if uniform:
        # Σ of the floored log-probs over all columns (floored like `losses.log_probs`). Flooring in place is
        # harmless for p below: exp of anything at or under -1e6 is 0 either way.
        all_sum = s.clamp_min_(LOG_PROB_FLOOR).sum(-1)  # (N,)
    p = s.exp_()  # (N, V) the student's probabilities, in the log-probs' buffer
    # The tail mass as a sum of the tail's own probabilities, not 1 − Σ p_ids: no cancellation when it is tiny.
    # The ids' columns are zeroed in place for the sum and then written back with the very values read out,
    # which costs two (N, k) scatters instead of an (N, V) copy.
    p_cols = p.gather(-1, target_cols)  # (N, k) p at the ids (unused slots: the first used id's)
    p.scatter_(-1, target_cols, torch.where(any_used, 0.0, p_cols))
    s_tail = p.sum(-1).log().clamp_min(LOG_PROB_FLOOR)  # (N,) log tail mass
    p.scatter_(-1, target_cols, p_cols)  # p restored exactly
    student = torch.cat([s_ids, s_tail.unsqueeze(-1)], dim=-1)  # (N, k+1)
    t_prob = teacher.exp()  # (N, k+1)
    kl = (t_prob * (teacher - student)).sum(-1)  # (N,) the coarse (bucket) divergence
    log_others = others.clamp_min(1).float().log()  # (N,)
    if uniform:
        # + tail mass × KL(uniform over the others ‖ the student's tail renormalized).
        # Σ over the tail = Σ over all − Σ over the ids; the rounding left is far below the mean's own size.
        tail_mean = (all_sum - torch.where(used, s_ids, 0.0).sum(-1)) / others.clamp_min(1)  # (N,)
        within = s_tail - log_others - tail_mean  # (N,)
        kl = kl + torch.where(others > 0, t_prob[:, -1] * within, 0.0)
    return kl, (p, p_cols, t_prob, target_cols, used, any_used, s_tail, log_others)


def _forward_kl_grad_in_place(state: tuple, scale: torch.Tensor | float, uniform: bool, plus_p: float = 0.0):
    """Turn the state's p (N, V) in place into scale·(p − q) + plus_p·p, q the teacher's target (module
    docstring), and return it. `scale` is a number or (N, 1); `plus_p` adds the cross-entropy's softmax term at
    τ = 1 (its −1 at the label is the caller's), folded into the same pass over (N, V)."""
    p, p_cols, t_prob, target_cols, used, any_used, s_tail, log_others = state
    t_ids, t_tail = t_prob[:, :-1], t_prob[:, -1]  # (N, k), (N,)
    # Every column as a tail token first, then the ids' columns overwritten with p − t. Overwritten, not
    # corrected by adding: p·(1 − ratio) + p·ratio would cancel badly when the ratio is large.
    if uniform:
        share = (t_tail.clamp_min(1e-45).log() - log_others).exp()  # (N,) each tail token's even share
        p.mul_(scale + plus_p).sub_(share.unsqueeze(-1) * scale)  # (N, V) scale·(p − share) + plus_p·p
    else:
        ratio = (t_tail.clamp_min(1e-45).log() - s_tail).exp()  # (N,) teacher tail mass / student tail mass
        p.mul_((1.0 - ratio).unsqueeze(-1) * scale + plus_p)  # scale·(p − t_tail · p / S_tail) + plus_p·p
    at_ids = (p_cols - t_ids) * scale + plus_p * p_cols  # (N, k) at the used slots
    # Unused slots point at the row's first used id: give them that slot's value, so every write agrees.
    first = used.int().argmax(-1, keepdim=True)  # (N, 1)
    at_ids = torch.where(used, at_ids, at_ids.gather(-1, first))
    at_ids = torch.where(any_used, at_ids, p.gather(-1, target_cols))  # no used slot: leave the row as is
    return p.scatter_(-1, target_cols, at_ids)


class _ForwardKL(torch.autograd.Function):
    """τ²·KL(teacher ‖ student) per token against distinct sparse targets, with the closed-form gradient
    τ·(p − q): q is the teacher's probability at each id and, on a tail token j, the teacher's tail mass times
    the student's own share p_j / S_tail (bucket) or split evenly (uniform)."""

    @staticmethod
    def forward(ctx, logits, teacher, ids, used, others, temperature, uniform):
        # logits (N, V) float; teacher (N, k+1) floored log-probs at τ; ids (N, k) in range; used (N, k) bool
        s = log_probs_unfloored(logits, temperature)  # (N, V), becomes p in place
        kl, state = _forward_kl_in_place(s, teacher, ids, used, others, uniform)
        ctx.save_for_backward(*state)
        ctx.temperature, ctx.uniform, ctx.dtype = temperature, uniform, logits.dtype
        return kl * (temperature * temperature)

    @staticmethod
    def backward(ctx, grad_out):
        state = list(ctx.saved_tensors)
        state[0] = state[0].clone()  # (N, V) the saved p stays intact (backward may run again with retain_graph)
        grad = _forward_kl_grad_in_place(tuple(state), grad_out.unsqueeze(-1) * ctx.temperature, ctx.uniform)
        return grad.to(ctx.dtype), None, None, None, None, None, None


def log_probs_unfloored(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 log-softmax of logits / τ in one kernel (a new tensor). (N, V) -> (N, V)."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1)


def sparse_token_divergence(
    student_logits: torch.Tensor, targets: SparseTargets, objective: Objective, vocab_size: int | None = None
) -> torch.Tensor:
    """Per-token divergence to sparse targets at the objective's temperature, times τ².
    (N, V'), targets of N -> (N,) float32.

    `student_logits` columns at or beyond `vocab_size` (default: all columns count) are ignored. Differentiable
    in `student_logits`; the targets are constants. The objective's weights are not applied.
    """
    temperature = objective.temperature
    logits = student_logits[..., :vocab_size] if vocab_size is not None else student_logits  # (N, V)
    vocab = logits.shape[-1]
    targets = targets.merged()
    uniform = targets.tail == "uniform"
    with torch.no_grad():
        teacher, used, others = _teacher_buckets(targets, temperature, vocab)  # (N, k+1), (N, k), (N,)
        safe_ids = targets.ids.clamp(0, vocab - 1)  # (N, k) unused slots point anywhere; they are masked below
    if objective.is_forward_kl:
        return _ForwardKL.apply(logits, teacher, safe_ids, used, others, temperature, uniform)
    with torch.no_grad():
        in_ids = _in_ids(logits.shape, safe_ids, used)  # (N, V)
    s_lp = log_probs(logits, temperature)  # (N, V)
    if uniform:
        with torch.no_grad():
            dense = _dense_teacher(teacher, safe_ids, used, in_ids, others)  # (N, V)
        per_token = divergence_from_log_probs(s_lp, dense, objective)  # (N,)
    else:
        s_ids = torch.where(used, s_lp.gather(-1, safe_ids), LOG_PROB_FLOOR)  # (N, k)
        s_tail = s_lp.masked_fill(in_ids, LOG_PROB_FLOOR).logsumexp(-1)  # (N,)
        student = torch.cat([s_ids, s_tail.unsqueeze(-1)], dim=-1).clamp_min(LOG_PROB_FLOOR)  # (N, k+1)
        per_token = divergence_from_log_probs(student, teacher, objective)  # (N,)
    return per_token * (temperature * temperature)


def sparse_forward_kl_chunk(
    logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    objective: Objective,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward KL to sparse targets for the fused loss, with no autograd: (Σ τ²·KL, Σ cross-entropy at τ = 1,
    d(kd_weight·Σ τ²·KL + ce_weight·Σ CE)/d(logits) or None). Every row counts. logits (n, V) float32,
    targets of n tokens, labels (n,) in [0, V). The objective must be forward KL (`Objective.is_forward_kl`);
    its temperature and both weights are used.

    The same values as `sparse_token_divergence` and `losses.token_cross_entropy` with autograd, for less work:
    one log-softmax serves the divergence and (at τ = 1) the cross-entropy, which is read at the labels before
    that buffer becomes the probabilities and then, in place, the gradient; so a chunk makes about as many
    passes over (n, V) as the hard-label loss alone (log-softmax, exp, one sum, one multiply).
    """
    if not objective.is_forward_kl:
        raise ValueError(f"sparse_forward_kl_chunk needs a forward KL objective, got {objective.divergence!r}")
    temperature, kd_weight, ce_weight = objective.temperature, objective.kd_weight, objective.ce_weight
    vocab = logits.shape[-1]
    targets = targets.merged()
    uniform = targets.tail == "uniform"
    teacher, used, others = _teacher_buckets(targets, temperature, vocab)  # (n, k+1), (n, k), (n,)
    safe_ids = targets.ids.clamp(0, vocab - 1)  # (n, k) unused slots point anywhere; they are masked
    at_label = labels.unsqueeze(1)  # (n, 1)
    s = log_probs_unfloored(logits, temperature)  # (n, V)
    # The cross-entropy is -log_softmax(logits)[label], exactly what F.cross_entropy computes.
    s1 = s if temperature == 1.0 else log_probs_unfloored(logits, 1.0)  # (n, V)
    ce = -s1.gather(1, at_label).sum()
    kl, state = _forward_kl_in_place(s, teacher, safe_ids, used, others, uniform)  # s is p from here on
    kd = kl.sum() * (temperature * temperature)
    if not need_grad:
        return kd, ce, None
    # At τ = 1 the cross-entropy's softmax is the divergence's p: its term is folded into the same pass.
    folded = ce_weight if temperature == 1.0 else 0.0
    if kd_weight:
        grad = _forward_kl_grad_in_place(state, kd_weight * temperature, uniform, folded)  # (n, V)
    else:
        grad = state[0].mul_(folded)  # (n, V) no divergence term; the softmax term at τ = 1 (or zero)
    if ce_weight:
        if temperature != 1.0:
            grad.add_(s1.exp_(), alpha=ce_weight)  # softmax at τ = 1
        grad.scatter_add_(1, at_label, grad.new_full(at_label.shape, -ce_weight))
    return kd, ce, grad


def sparse_loss_sums(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    objective: Objective,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `losses.loss_sums` with sparse targets: sums over tokens where labels != -100 of (divergence × τ², CE).

    Shapes: student_logits (N, V'), targets of N tokens, labels (N,). The cross-entropy is the student's at
    temperature 1 over the first `vocab_size` columns. The sums are not weighted (the caller applies the objective's
    kd_weight and ce_weight).
    """
    logits = student_logits[..., :vocab_size] if vocab_size is not None else student_logits  # (N, V)
    counted = (labels != IGNORE_INDEX).float()  # (N,)
    kd = sparse_token_divergence(logits, targets, objective)  # (N,)
    ce = token_cross_entropy(logits, labels)  # (N,)
    return (kd * counted).sum(), (ce * counted).sum()
