"""The loss library: hand-computed values, a dense float64 reference (values and gradients), invariants."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.dense import (
    DIVERGENCES,
    distillation_loss,
    loss_sums,
    token_cross_entropy,
    token_divergence,
)
from distill.losses.objective import Objective

# Teacher P_t = [1/4, 3/4], student P_s = [1/2, 1/2] at temperature 1.
TEACHER = torch.tensor([[0.0, math.log(3.0)]])
STUDENT = torch.tensor([[0.0, 0.0]])


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


PT, PS = [0.25, 0.75], [0.5, 0.5]
HAND = {
    "forward_kl": kl(PT, PS),
    "reverse_kl": kl(PS, PT),
    "jsd": 0.5 * kl(PT, [0.375, 0.625]) + 0.5 * kl(PS, [0.375, 0.625]),  # β = 0.5
    "skew_forward_kl": kl(PT, [0.1 * 0.25 + 0.9 * 0.5, 0.1 * 0.75 + 0.9 * 0.5]),  # α = 0.1
    "skew_reverse_kl": kl(PS, [0.1 * 0.5 + 0.9 * 0.25, 0.1 * 0.5 + 0.9 * 0.75]),
    "tvd": 0.25,
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_hand_computed_value(divergence):
    value = distillation_loss(STUDENT, TEACHER, divergence=divergence, beta=0.5, skew=0.1)
    assert value.item() == pytest.approx(HAND[divergence], rel=1e-6)


def test_hand_computed_forward_kl_numbers():
    # Written out once in plain numbers so a mistake in the helper `kl` cannot hide one in the library.
    assert distillation_loss(STUDENT, TEACHER).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))


def test_temperature_scales_both_sides_and_multiplies_by_tau_squared():
    # At τ = 2 the teacher becomes softmax([0, ln 3 / 2]) = [1, √3] / (1 + √3); the student stays uniform.
    pt = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    expected = 4.0 * kl(pt, [0.5, 0.5])
    assert distillation_loss(STUDENT, TEACHER, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_term_and_mask():
    student = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [0.0, 0.0]])
    mask = torch.tensor([True, True, False])
    labels = torch.tensor([1, 0, -100])
    # KD over tokens 0 and 1: (kl(PT, PS) + 0) / 2; CE over the same two tokens: (ln 2 + ln 4) / 2.
    expected = kl(PT, PS) / 2 + 0.5 * (math.log(2) + math.log(4)) / 2
    value = distillation_loss(student, teacher, mask=mask, labels=labels, ce_weight=0.5)
    assert value.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- dense reference


def reference(student_logits, teacher_logits, divergence, beta, skew, temperature):
    """Straightforward float64 implementation from the definitions, probabilities not log-probabilities."""
    ps = torch.softmax(student_logits.double() / temperature, -1)
    pt = torch.softmax(teacher_logits.double() / temperature, -1)

    def kl_(p, q):
        return (p * (p / q).log()).sum(-1)

    if divergence == "forward_kl":
        d = kl_(pt, ps)
    elif divergence == "reverse_kl":
        d = kl_(ps, pt)
    elif divergence == "jsd":
        if beta == 0:
            d = kl_(pt, ps)
        elif beta == 1:
            d = kl_(ps, pt)
        else:
            m = beta * pt + (1 - beta) * ps
            d = beta * kl_(pt, m) + (1 - beta) * kl_(ps, m)
    elif divergence == "skew_forward_kl":
        d = kl_(pt, skew * pt + (1 - skew) * ps)
    elif divergence == "skew_reverse_kl":
        d = kl_(ps, skew * ps + (1 - skew) * pt)
    else:
        d = 0.5 * (pt - ps).abs().sum(-1)
    return d * temperature**2


CASES = [(d, 0.5, 0.1) for d in DIVERGENCES] + [("jsd", 0.0, 0.1), ("jsd", 1.0, 0.1), ("jsd", 0.9, 0.1)]
CASES += [("skew_forward_kl", 0.5, 0.0), ("skew_reverse_kl", 0.5, 0.3)]


@pytest.mark.parametrize("divergence,beta,skew", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_dense_reference_values_and_gradients(divergence, beta, skew, temperature):
    torch.manual_seed(0)
    student = (torch.randn(3, 5, 17) * 2).requires_grad_(True)
    teacher = (torch.randn(3, 5, 17) * 2).requires_grad_(True)
    mask = torch.rand(3, 5) > 0.3
    ours = distillation_loss(student, teacher, divergence, beta, skew, temperature, mask=mask)
    ours.backward()
    s_ref = student.detach().double().requires_grad_(True)
    t_ref = teacher.detach().double().requires_grad_(True)
    per_token = reference(s_ref, t_ref, divergence, beta, skew, temperature)
    expected = (per_token * mask).sum() / mask.sum()
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(student.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(teacher.grad.double(), t_ref.grad, rtol=1e-4, atol=1e-7)


def test_cross_entropy_matches_reference():
    torch.manual_seed(1)
    logits = torch.randn(4, 11)
    labels = torch.tensor([3, -100, 0, 10])
    ours = token_cross_entropy(logits, labels)
    expected = -torch.log_softmax(logits.double(), -1)[torch.arange(4), labels.clamp_min(0)]
    expected[1] = 0.0
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_for_identical_inputs_and_nonnegative(divergence):
    torch.manual_seed(2)
    logits = torch.randn(4, 9) * 3
    assert distillation_loss(logits, logits.clone(), divergence).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 9) * 3
    assert distillation_loss(logits, other, divergence).item() > 0.0


def test_jsd_endpoints_are_forward_and_reverse_kl():
    torch.manual_seed(3)
    s, t = torch.randn(6, 13), torch.randn(6, 13)
    forward = distillation_loss(s, t, "forward_kl")
    reverse = distillation_loss(s, t, "reverse_kl")
    torch.testing.assert_close(distillation_loss(s, t, "jsd", beta=0.0), forward)
    torch.testing.assert_close(distillation_loss(s, t, "jsd", beta=1.0), reverse)
    # And the skew objectives at α = 0 are the plain KLs.
    torch.testing.assert_close(distillation_loss(s, t, "skew_forward_kl", skew=0.0), forward)
    torch.testing.assert_close(distillation_loss(s, t, "skew_reverse_kl", skew=0.0), reverse)


def test_jsd_half_is_symmetric():
    torch.manual_seed(4)
    s, t = torch.randn(6, 13), torch.randn(6, 13)
    torch.testing.assert_close(distillation_loss(s, t, "jsd", beta=0.5), distillation_loss(t, s, "jsd", beta=0.5))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_columns_with_minus_inf_contribute_nothing(divergence):
    torch.manual_seed(5)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    pad = torch.full((4, 3), float("-inf"))
    s_padded = torch.cat([s, pad], -1).requires_grad_(True)
    t_padded = torch.cat([t, pad], -1)
    value = distillation_loss(s_padded, t_padded, divergence, beta=0.3)
    value.backward()
    assert torch.isfinite(value)
    torch.testing.assert_close(value, distillation_loss(s, t, divergence, beta=0.3))
    assert torch.isfinite(s_padded.grad).all()
    assert (s_padded.grad[:, 10:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    torch.manual_seed(6)
    s, t = torch.randn(8, 32), torch.randn(8, 32)
    low = distillation_loss(s.to(dtype), t.to(dtype), "jsd")
    assert low.dtype == torch.float32
    # The only difference left is the rounding of the inputs themselves.
    torch.testing.assert_close(low, distillation_loss(s.to(dtype).float(), t.to(dtype).float(), "jsd"))


def test_all_masked_gives_zero_not_nan():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    value = distillation_loss(s, t, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0


def test_shapes_and_sums_agree_with_mean():
    torch.manual_seed(7)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    assert token_divergence(s, t, Objective()).shape == (2, 5)
    kd_sum, ce_sum = loss_sums(s, t, labels, Objective())
    counted = labels != -100
    torch.testing.assert_close(kd_sum / counted.sum(), distillation_loss(s, t, mask=counted))
    expected = distillation_loss(s, t, mask=counted, labels=labels, ce_weight=1.0)
    torch.testing.assert_close((kd_sum + ce_sum) / counted.sum(), expected)
    no_teacher_kd, no_teacher_ce = loss_sums(s, None, labels, Objective())
    assert no_teacher_kd.item() == 0.0 and no_teacher_ce.item() == pytest.approx(ce_sum.item())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"divergence": "kl"}, "unknown divergence"),
        ({"divergence": "jsd", "beta": 1.5}, "beta"),
        ({"divergence": "skew_forward_kl", "skew": -0.1}, "skew"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.zeros(1, 3), torch.zeros(1, 3), **kwargs)
