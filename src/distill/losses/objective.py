"""One objective value: which divergence, its coefficients, the temperature and the two terms' weights.

The dense, sparse and fused paths all read it; the rules that depend on several of its fields together (is this
objective forward KL? reverse KL?) live here once instead of in each path.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.losses.dense import check_objective


@dataclass(frozen=True)
class Objective:
    """What the student is trained to minimize: kd_weight · divergence(P_t, P_s) · τ² + ce_weight · CE(labels).

    divergence   one of `distill.losses.dense.DIVERGENCES` (see there for the definitions and papers)
    beta (β)     jsd only: the mixture weight of the student; 0 = forward_kl, 1 = reverse_kl, 0.5 = symmetric JSD
    skew (α)     skew_* only: share of the mixture taken by the first argument; 0 = the plain KL of that direction,
                 larger values bound the divergence (it stays finite where the second distribution has no mass)
    temperature  τ: both distributions are softmax(logits / τ); 1 = the models' own distributions. The divergence
                 is multiplied by τ² so gradients keep their size across τ (Hinton et al. 2015); the cross-entropy
                 is always at τ = 1
    kd_weight    weight of the divergence term; 0 = train on hard labels only
    ce_weight    weight of the hard-label cross-entropy term; 0 = pure distillation
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0

    def __post_init__(self) -> None:
        check_objective(self.divergence, self.beta, self.skew, self.temperature)

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
        )

    @property
    def divergence_args(self) -> dict:
        """The divergence's keyword arguments of the loss functions (`dense.loss_sums`, `sparse.sparse_loss_sums`,
        `fused.fused_loss_sums`), which keep them as plain keywords for callers without a recipe."""
        return {"divergence": self.divergence, "beta": self.beta, "skew": self.skew, "temperature": self.temperature}

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
