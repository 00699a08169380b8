"""Distillation objectives as pure functions on tensors.

Every path that trains a student (plain, fused, cached, on-policy) computes its per-token divergence with
`divergence_from_log_probs` (through `token_divergence` on logits) so that one definition, tested once against
hand-computed values and a dense reference, decides what is optimized. Every function here that depends on the
objective takes one `distill.losses.objective.Objective`; only the public `distillation_loss` takes plain keywords.

Definitions (P_t, P_s = teacher and student distributions at the given temperature):

- ``forward_kl``       KL(P_t ‖ P_s), mode-covering; the classic KD objective (Hinton et al. 2015).
- ``reverse_kl``       KL(P_s ‖ P_t), mode-seeking (MiniLLM, Gu et al. 2024).
- ``jsd``              generalized Jensen-Shannon, β·KL(P_t‖M) + (1−β)·KL(P_s‖M), M = β·P_t + (1−β)·P_s
                       (GKD, Agarwal et al. 2024). β=0 means forward_kl, β=1 means reverse_kl: the mixture
                       formula itself vanishes at both ends, so the ends are defined as the KLs they
                       approach in direction, as GKD and TRL do.
- ``skew_forward_kl``  KL(P_t ‖ α·P_t + (1−α)·P_s); α=0 is forward_kl, larger α bounds the divergence and
                       its gradient (DistiLLM, Ko et al. 2024).
- ``skew_reverse_kl``  KL(P_s ‖ α·P_s + (1−α)·P_t); α=0 is reverse_kl (DistiLLM, Ko et al. 2024).
- ``tvd``              total variation distance ½·Σ|P_t − P_s|.

All arithmetic happens in float32 whatever the input dtype. Log-probabilities are floored at a very negative
finite value so that tokens masked with -inf logits on both sides (padded vocabularies) contribute exactly
zero instead of NaN, in values and in gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses.objective import DIVERGENCES, Objective

IGNORE_INDEX = -100

# exp(-1e6) is exactly zero in every float format, so the floor changes no probability; it only keeps
# differences of log-probabilities finite where both sides are -inf.
LOG_PROB_FLOOR = -1.0e6


def log_probs(logits: torch.Tensor, temperature: float = 1.0, *, in_place_floor: bool = False) -> torch.Tensor:
    """Floored float32 log-softmax of `logits / temperature` over the last dimension. (..., V) -> (..., V).

    `in_place_floor` applies the floor to the log-softmax's own buffer instead of a copy: one (..., V) buffer
    fewer, for callers outside autograd only (the log-softmax's backward needs its unfloored output)."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # no (N, V) copy at τ = 1
    lp = F.log_softmax(scaled, dim=-1)
    return lp.clamp_min_(LOG_PROB_FLOOR) if in_place_floor else lp.clamp_min(LOG_PROB_FLOOR)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) summed over the last dimension from log-probabilities. (..., V) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·P + (1−w)·Q) for 0 < w < 1, computed stably in log space. (..., V) -> (..., V)."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def divergence_from_log_probs(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, objective: Objective
) -> torch.Tensor:
    """Per-token divergence between two normalized float32 log-distributions. (..., V), (..., V) -> (...).

    The objective's divergence, β and α; the log-probabilities are taken as already at its temperature, and no
    τ² factor is applied here (see `token_divergence`). The ends of the jsd / skew families are the plain KLs
    (`Objective.is_forward_kl`, `is_reverse_kl`).
    """
    s, t = student_log_probs, teacher_log_probs
    if objective.is_forward_kl:
        return _kl(t, s)
    if objective.is_reverse_kl:
        return _kl(s, t)
    divergence, beta, skew = objective.divergence, objective.beta, objective.skew
    if divergence == "jsd":
        log_m = _log_mixture(t, s, beta)
        return beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)
    if divergence == "skew_forward_kl":
        return _kl(t, _log_mixture(t, s, skew))
    if divergence == "skew_reverse_kl":
        return _kl(s, _log_mixture(s, t, skew))
    if divergence == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Per-token divergence at the objective's temperature, times τ². (..., V), (..., V) -> (...) float32.

    The τ² factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015), so the
    hard-label term's weight means the same thing at every temperature. The objective's weights are not applied.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    tau = objective.temperature
    per_token = divergence_from_log_probs(log_probs(student_logits, tau), log_probs(teacher_logits, tau), objective)
    return per_token * (tau * tau)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token float32 cross-entropy against `labels`; 0 where labels == -100. (..., V), (...) -> (...)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    per_token = F.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.reshape(labels.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is True; 0 (not NaN) when nothing is counted."""
    mask = mask.to(values.dtype)
    # clamp_min instead of a branch on the count: no host sync, and an all-masked batch gives 0.
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Mean per-token divergence (× temperature²) over counted tokens + `ce_weight` × mean cross-entropy.

    Shapes: logits (..., V); `mask` (...) bool, True = the token counts (default: all); `labels` (...) int with
    -100 = ignore, needed when `ce_weight` > 0. The cross-entropy term is taken at temperature 1 on the
    student's logits. Returns a float32 scalar. The public entry point: plain keywords (the interface contract),
    checked by building an `Objective`.
    """
    objective = Objective(divergence, beta, skew, temperature, ce_weight=ce_weight)  # checks its arguments
    per_token = token_divergence(student_logits, teacher_logits, objective)  # (...)
    if mask is None:
        mask = torch.ones_like(per_token, dtype=torch.bool)
    loss = masked_mean(per_token, mask)
    if objective.ce_weight:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        ce = token_cross_entropy(student_logits, labels)  # (...)
        loss = loss + objective.ce_weight * masked_mean(ce, labels != IGNORE_INDEX)
    return loss


def loss_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    objective: Objective,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums, not means, over the tokens where labels != -100: (divergence × τ², cross-entropy).

    The training loop divides both by the number of loss tokens in the whole global batch, which is what
    makes 8 micro-batches of 1 give the same update as 1 batch of 8. `teacher_logits=None` (training on
    hard labels only) gives a zero divergence sum. Shapes: logits (..., V), labels (...). The sums are not
    weighted: the caller applies the objective's kd_weight and ce_weight.
    """
    counted = (labels != IGNORE_INDEX).float()  # (...)
    ce_sum = (token_cross_entropy(student_logits, labels) * counted).sum()
    if teacher_logits is None:
        return ce_sum.new_zeros(()), ce_sum
    kd = token_divergence(student_logits, teacher_logits, objective)  # (...)
    return (kd * counted).sum(), ce_sum
