"""One objective value: which divergence, its coefficients, the temperature and the terms' weights.

Every function of `distill.losses` whose result depends on the objective (dense, sparse and fused paths alike)
takes one `Objective` instead of loose keywords; only the public `distillation_loss` keeps plain keywords and builds
one. The rules that depend on several fields together (is this objective forward KL? reverse KL?) live here once
instead of in each path. The definitions of the divergences are in `distill.losses.dense`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
HIDDEN_LOSSES = ("cosine", "mse")  # see distill.losses.hidden


@dataclass(frozen=True)
class Objective:
    """What the student is trained to minimize: kd_weight · divergence(P_t, P_s) · τ² + ce_weight · CE(labels)
    + hidden_weight · hidden-state loss (`distill.losses.hidden`; its layer pairs come with the models).

    divergence   one of `DIVERGENCES` (see `distill.losses.dense` for the definitions and papers)
    beta (β)     jsd only: the mixture weight of the student; 0 = forward_kl, 1 = reverse_kl, 0.5 = symmetric JSD
    skew (α)     skew_* only: share of the mixture taken by the first argument; 0 = the plain KL of that direction,
                 larger values bound the divergence (it stays finite where the second distribution has no mass)
    temperature  τ: both distributions are softmax(logits / τ); 1 = the models' own distributions. The divergence
                 is multiplied by τ² so gradients keep their size across τ (Hinton et al. 2015); the cross-entropy
                 is always at τ = 1
    kd_weight    weight of the divergence term; 0 = train on hard labels only
    ce_weight    weight of the hard-label cross-entropy term; 0 = pure distillation
    hidden_weight  weight of the hidden-state term; 0 = none (the default)
    hidden_loss  cosine | mse: the hidden-state term's per-token loss
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_loss: str = "cosine"

    def __post_init__(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {self.skew}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(
                f"unknown hidden-state loss {self.hidden_loss!r}; choose one of {', '.join(HIDDEN_LOSSES)}"
            )

    @classmethod
    def from_config(cls, section) -> Objective:
        """From the recipe's `objective` section (`distill.config.ObjectiveConfig`); `fused` is not part of it."""
        return cls(
            divergence=section.divergence,
            beta=section.beta,
            skew=section.skew,
            temperature=section.temperature,
            kd_weight=section.kd_weight,
            ce_weight=section.ce_weight,
            hidden_weight=section.hidden.weight,
            hidden_loss=section.hidden.loss,
        )

    @property
    def is_forward_kl(self) -> bool:
        """Forward KL, by name or as an end of a family: jsd with β = 0, skew_forward_kl with α = 0."""
        d = self.divergence
        return d == "forward_kl" or (d == "jsd" and self.beta == 0.0) or (d == "skew_forward_kl" and self.skew == 0.0)

    @property
    def is_reverse_kl(self) -> bool:
        """Reverse KL, by name or as an end of a family: jsd with β = 1, skew_reverse_kl with α = 0."""
        d = self.divergence
        return d == "reverse_kl" or (d == "jsd" and self.beta == 1.0) or (d == "skew_reverse_kl" and self.skew == 0.0)
