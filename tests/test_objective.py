"""The Objective value: its forward/reverse-KL rule agrees with the divergences themselves, and it reads a recipe."""

import pytest
import torch

from distill.config import ObjectiveConfig
from distill.losses.dense import DIVERGENCES, token_divergence
from distill.losses.objective import Objective

CASES = [(d, beta, skew) for d in DIVERGENCES for beta in (0.0, 0.5, 1.0) for skew in (0.0, 0.3)]


@pytest.mark.parametrize(("divergence", "beta", "skew"), CASES)
def test_forward_and_reverse_kl_rules_match_the_divergences(divergence, beta, skew):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g) * 2  # (N, V)
    o = Objective(divergence, beta, skew, temperature=1.5)
    value = token_divergence(s, t, o)  # (N,)
    forward = token_divergence(s, t, Objective("forward_kl", temperature=1.5))
    reverse = token_divergence(s, t, Objective("reverse_kl", temperature=1.5))
    # The rule says "forward KL" exactly when the divergence's values are forward KL's (likewise reverse).
    assert o.is_forward_kl == torch.allclose(value, forward, atol=1e-6)
    assert o.is_reverse_kl == torch.allclose(value, reverse, atol=1e-6)


def test_from_config_reads_every_field_and_bad_values_are_refused():
    section = ObjectiveConfig(divergence="jsd", beta=0.25, skew=0.2, temperature=2.0, kd_weight=0.5, ce_weight=0.3)
    o = Objective.from_config(section)
    assert (o.divergence, o.beta, o.skew, o.temperature, o.kd_weight, o.ce_weight) == ("jsd", 0.25, 0.2, 2.0, 0.5, 0.3)
    with pytest.raises(ValueError, match="beta"):
        Objective("jsd", beta=1.5)
    with pytest.raises(ValueError, match="unknown divergence"):
        Objective("kl")
