"""Sparse (top-k + rest) teacher targets: hand-computed values, dense cross-checks, invariants."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from distill.losses.dense import DIVERGENCES, loss_sums
from distill.losses.objective import Objective
from distill.losses.sparse import SparseTargets, sparse_loss_sums, sparse_token_divergence, top_k_targets

OBJECTIVES = [
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 1.0, 0.1),
    ("skew_forward_kl", 0.5, 0.1),
    ("skew_reverse_kl", 0.5, 0.1),
    ("tvd", 0.5, 0.1),
]
# With a teacher that puts zero mass outside its k ids, these stay finite and coarse-graining is exact.
FINITE_ON_ZERO_TAIL = [o for o in OBJECTIVES if o[0] != "reverse_kl" and o[:2] != ("jsd", 1.0)]


def _logits(n: int, v: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=generator) * scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_hand_computed_forward_kl_and_temperature_tail():
    # Teacher p = [0.5, 0.2, 0.2, 0.1] stored as top-1: id 0 with 0.5, rest 0.5. Student uniform over 4 tokens.
    targets = SparseTargets(torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]), torch.tensor([math.log(0.5)]))
    student = torch.zeros(1, 4)
    kd = sparse_token_divergence(student, targets, Objective("forward_kl"))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd.shape == (1,)
    assert kd.item() == pytest.approx(expected, rel=1e-6)

    # τ = 2: id bucket log(0.5)/2; tail = log 3 + (log 0.5 − log 3)/2 (uniform over the 3 others); renormalized.
    # The uniform student is the same at any temperature: buckets [1/4, 3/4].
    tau = 2.0
    a, b = math.log(0.5) / tau, math.log(3) + (math.log(0.5) - math.log(3)) / tau
    z = math.log(math.exp(a) + math.exp(b))
    pt = [math.exp(a - z), math.exp(b - z)]
    expected_tau = tau * tau * (pt[0] * math.log(pt[0] / 0.25) + pt[1] * math.log(pt[1] / 0.75))
    kd_tau = sparse_token_divergence(student, targets, Objective("forward_kl", temperature=tau))
    assert kd_tau.item() == pytest.approx(expected_tau, rel=1e-6)


@pytest.mark.parametrize(("divergence", "beta", "skew"), OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_k_equals_v_minus_1_matches_dense(divergence, beta, skew, temperature):
    # One token left in the tail: the coarse distribution is the full one at any temperature.
    n, v = 9, 12
    student, teacher = _logits(n, v, 0).requires_grad_(True), _logits(n, v, 1)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2))
    labels[3] = -100
    targets = top_k_targets(teacher, v - 1)
    kd, ce = sparse_loss_sums(student, targets, labels, Objective(divergence, beta, skew, temperature))
    ref_kd, ref_ce = loss_sums(student, teacher, labels, Objective(divergence, beta, skew, temperature))
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-6)
    grad = torch.autograd.grad(kd, student)[0]
    ref_grad = torch.autograd.grad(ref_kd, student)[0]
    assert _rel(grad, ref_grad) < 1e-5


@pytest.mark.parametrize(("divergence", "beta", "skew"), FINITE_ON_ZERO_TAIL)
def test_teacher_with_exactly_k_tokens_matches_dense(divergence, beta, skew):
    n, v, k = 7, 20, 5
    teacher = _logits(n, v, 3)
    keep = torch.randperm(v, generator=torch.Generator().manual_seed(4))[:k]
    outside = torch.ones(v, dtype=torch.bool)
    outside[keep] = False
    teacher[:, outside] = float("-inf")  # (n, v) the teacher has exactly k tokens with mass
    student = _logits(n, v, 5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(6))
    targets = top_k_targets(teacher, k)
    assert torch.isneginf(targets.log_rest).all()
    kd, _ = sparse_loss_sums(student, targets, labels, Objective(divergence, beta, skew))
    ref_kd, _ = loss_sums(student, teacher, labels, Objective(divergence, beta, skew))
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-5)
    assert _rel(torch.autograd.grad(kd, student)[0], torch.autograd.grad(ref_kd, student)[0]) < 1e-5


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_when_student_is_teacher(divergence):
    logits = _logits(6, 30, 7)
    kd = sparse_token_divergence(logits, top_k_targets(logits, 4), Objective(divergence))
    assert kd.abs().max().item() < 1e-5


def test_coarse_graining_lowers_forward_kl():
    student, teacher = _logits(16, 40, 8), _logits(16, 40, 9)
    dense = loss_sums(student, teacher, torch.zeros(16, dtype=torch.long), Objective())[0]
    for k in (1, 4, 16):
        sparse = sparse_token_divergence(student, top_k_targets(teacher, k), Objective()).sum()
        assert 0.0 < sparse.item() <= dense.item()


@pytest.mark.parametrize(("divergence", "beta", "skew"), OBJECTIVES)
def test_slot_order_padding_and_duplicates_do_not_matter(divergence, beta, skew):
    student, teacher = _logits(5, 25, 10), _logits(5, 25, 11)
    base = top_k_targets(teacher, 4)
    ref = sparse_token_divergence(student, base, Objective(divergence, beta, skew, temperature=1.5))

    perm = torch.tensor([2, 0, 3, 1])
    permuted = replace(base, ids=base.ids[:, perm], log_probs=base.log_probs[:, perm])
    # Two unused slots: one marked by id -1, one by a -inf log-probability (its id may be anything, even a used one).
    pad_ids = torch.cat([base.ids, torch.full((5, 1), -1), base.ids[:, :1]], dim=1)  # (5, 6)
    pad_lp = torch.cat([base.log_probs, torch.zeros(5, 1), torch.full((5, 1), float("-inf"))], dim=1)  # (5, 6)
    padded = replace(base, ids=pad_ids, log_probs=pad_lp, distinct=False)
    # The first id split into two slots of half its probability each.
    half = base.log_probs[:, :1] - math.log(2.0)  # (5, 1)
    split = replace(
        base,
        ids=torch.cat([base.ids, base.ids[:, :1]], dim=1),
        log_probs=torch.cat([half, base.log_probs[:, 1:], half], dim=1),
        distinct=False,
    )
    for variant in (permuted, padded, split):
        got = sparse_token_divergence(student, variant, Objective(divergence, beta, skew, temperature=1.5))
        assert got.shape == (5,)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_padded_student_vocabulary_is_ignored():
    student, teacher = _logits(4, 18, 12), _logits(4, 18, 13)
    targets = top_k_targets(teacher, 3)
    labels = torch.tensor([0, 5, -100, 17])
    padded = torch.cat([student, torch.full((4, 6), 50.0)], dim=1)  # (4, 24) junk columns with huge logits
    assert torch.allclose(
        torch.stack(sparse_loss_sums(padded, targets, labels, Objective(), vocab_size=18)),
        torch.stack(sparse_loss_sums(student, targets, labels, Objective())),
    )


def test_top_k_targets_drops_padding_and_keeps_rest_mass():
    teacher = _logits(3, 10, 14)
    padded = torch.cat([teacher, torch.full((3, 2), 100.0)], dim=1)  # (3, 12) the padding would win top-k
    targets = top_k_targets(padded, 4, vocab_size=10)
    assert targets.ids.shape == (3, 4) and targets.log_probs.shape == (3, 4) and targets.log_rest.shape == (3,)
    assert int(targets.ids.max()) < 10
    total = targets.log_probs.exp().sum(-1) + targets.log_rest.exp()
    assert torch.allclose(total, torch.ones(3), atol=1e-6)


def test_uninformative_rows_stay_finite_and_masked_rows_count_nothing():
    student = _logits(3, 8, 15).requires_grad_(True)
    targets = SparseTargets(
        torch.tensor([[1, 2], [-1, -1], [3, -1]]),
        torch.tensor([[math.log(0.6), math.log(0.3)], [0.0, 0.0], [0.0, float("-inf")]]),
        torch.tensor([math.log(0.1), float("-inf"), float("-inf")]),
    )
    labels = torch.tensor([4, -100, 3])
    for divergence in DIVERGENCES:
        kd, _ = sparse_loss_sums(student, targets, labels, Objective(divergence))
        (grad,) = torch.autograd.grad(kd, student)
        assert torch.isfinite(kd) and torch.isfinite(grad).all()
        assert grad[1].abs().max().item() == 0.0  # the masked row gets no gradient


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="sparse targets need"):
        SparseTargets(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3), torch.zeros(3))


def _uniform_tail_dense_logits(targets, v: int) -> torch.Tensor:
    """The full teacher that the `uniform` tail stands for: the stored log-probs at the ids, the rest mass split
    evenly over the other tokens. (N, v) log-probs."""
    k = targets.ids.shape[1]
    dense = (targets.log_rest - math.log(v - k)).unsqueeze(-1).expand(-1, v).clone()  # (N, v)
    return dense.scatter(-1, targets.ids, targets.log_probs)


@pytest.mark.parametrize(("divergence", "beta", "skew"), OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uniform_tail_equals_the_dense_loss_of_the_spread_teacher(divergence, beta, skew, temperature):
    n, v, k = 6, 30, 5
    student = _logits(n, v, 20).requires_grad_(True)
    # Without log_rest_half the tail is flat at every τ, which is what the dense reference spreads.
    targets = replace(top_k_targets(_logits(n, v, 21, scale=3.0), k), tail="uniform", log_rest_half=None)
    labels = torch.arange(n)
    objective = Objective(divergence, beta, skew, temperature)
    kd, _ = sparse_loss_sums(student, targets, labels, objective)
    ref, _ = loss_sums(student, _uniform_tail_dense_logits(targets, v), labels, objective)
    assert kd.item() == pytest.approx(ref.item(), rel=1e-5)
    assert _rel(torch.autograd.grad(kd, student)[0], torch.autograd.grad(ref, student)[0]) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_closed_form_gradient_matches_autograd_on_buckets(temperature):
    # Reference: both sides coarse-grained by hand (one bucket per id, one for the rest), KL by autograd.
    n, v, k = 8, 40, 6
    student = _logits(n, v, 22).requires_grad_(True)
    targets = replace(top_k_targets(_logits(n, v, 23, scale=3.0), k), log_rest_half=None)  # flat tail, as below
    kd = sparse_token_divergence(student, targets, Objective(temperature=temperature))

    others = torch.ones(n, v, dtype=torch.bool).scatter(-1, targets.ids, False)  # (n, v)
    s_lp = torch.log_softmax(student / temperature, -1)
    s_b = torch.cat([s_lp.gather(-1, targets.ids), s_lp.masked_fill(~others, -math.inf).logsumexp(-1, True)], -1)
    log_r = targets.log_rest - math.log(v - k)  # each other token's share at τ = 1
    t_b = torch.cat([targets.log_probs / temperature, (math.log(v - k) + log_r / temperature).unsqueeze(-1)], -1)
    t_b = torch.log_softmax(t_b, -1)
    ref = (t_b.exp() * (t_b - s_b)).sum(-1) * temperature**2
    torch.testing.assert_close(kd, ref, rtol=1e-5, atol=1e-6)
    grad, ref_grad = (torch.autograd.grad(x.sum(), student)[0] for x in (kd, ref))
    assert _rel(grad, ref_grad) < 1e-5
    # jsd at β = 0 and skew_forward_kl at α = 0 are forward KL and take the same path.
    for divergence, beta, skew in (("jsd", 0.0, 0.1), ("skew_forward_kl", 0.5, 0.0)):
        other = sparse_token_divergence(student, targets, Objective(divergence, beta, skew, temperature))
        torch.testing.assert_close(other, kd)


def test_uniform_tail_adds_the_within_tail_divergence_to_the_bucket_one():
    student, teacher = _logits(10, 50, 24), _logits(10, 50, 25)
    bucket = top_k_targets(teacher, 8)
    uniform = replace(bucket, tail="uniform")
    coarse = sparse_token_divergence(student, bucket, Objective())
    spread = sparse_token_divergence(student, uniform, Objective())
    assert (spread >= coarse - 1e-6).all() and (spread > coarse).any()
    # A student whose tail is already flat gets nothing extra.
    flat = student.scatter(-1, bucket.ids, 0.0).masked_fill(
        torch.ones_like(student, dtype=torch.bool).scatter(-1, bucket.ids, False), 0.0
    )
    flat = flat.scatter(-1, bucket.ids, student.gather(-1, bucket.ids))
    torch.testing.assert_close(
        sparse_token_divergence(flat, uniform, Objective()), sparse_token_divergence(flat, bucket, Objective())
    )


def test_merged_sums_repeats_and_marks_targets_distinct():
    targets = SparseTargets(
        torch.tensor([[3, 1, 3, -1]]),
        torch.tensor([[math.log(0.2), math.log(0.3), math.log(0.1), 0.0]]),
        torch.tensor([math.log(0.4)]),
    )
    merged = targets.merged()
    assert merged.distinct and not targets.distinct and merged.merged() is merged
    assert merged.ids.tolist() == [[3, 1, -1, -1]]
    torch.testing.assert_close(merged.log_probs[0, :2].exp(), torch.tensor([0.3, 0.3]))
    assert torch.isneginf(merged.log_probs[0, 2:]).all()
    assert top_k_targets(_logits(2, 9, 26), 3).distinct


def test_unknown_tail_is_rejected():
    with pytest.raises(ValueError, match="tail treatment"):
        SparseTargets(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), torch.zeros(1), tail="spread")


def _exact_bucket_forward_kl(student, teacher, ids, temperature):
    """τ²·KL between the dense tempered distributions coarse-grained to (each id, the rest). (N,)"""
    s_lp, t_lp = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)

    def buckets(lp):
        return torch.cat([lp.gather(-1, ids), lp.scatter(-1, ids, -math.inf).logsumexp(-1, True)], -1)

    s_b, t_b = buckets(s_lp), buckets(t_lp)
    return (t_b.exp() * (t_b - s_b)).sum(-1) * temperature**2


def test_tail_half_mass_makes_temperature_2_exact_and_beats_the_flat_tail_elsewhere():
    n, v, k = 12, 200, 8
    generator = torch.Generator().manual_seed(27)
    # A teacher with a steep, Zipf-like tail (far from flat), like a trained LM's.
    teacher = -1.2 * torch.log(torch.arange(1, v + 1).float()) + 0.3 * torch.randn(n, v, generator=generator)
    teacher = teacher[:, torch.randperm(v, generator=generator)]
    student = _logits(n, v, 28)
    targets = top_k_targets(teacher, k)
    assert targets.log_rest_half is not None
    flat = replace(targets, log_rest_half=None)
    for tau in (2.0, 1.5, 3.0, 0.7):
        exact = _exact_bucket_forward_kl(student, teacher, targets.ids, tau)
        with_half = sparse_token_divergence(student, targets, Objective(temperature=tau))
        without = sparse_token_divergence(student, flat, Objective(temperature=tau))
        error, flat_error = (with_half - exact).abs().mean(), (without - exact).abs().mean()
        if tau == 2.0:
            torch.testing.assert_close(with_half, exact, rtol=1e-5, atol=1e-5)
        assert error < flat_error, (tau, float(error), float(flat_error))
    torch.testing.assert_close(  # τ = 1 needs no estimate: the statistic changes nothing
        sparse_token_divergence(student, targets, Objective()),
        sparse_token_divergence(student, flat, Objective()),
        rtol=0,
        atol=0,
    )


def _targets_with_unused_slots(n: int, v: int, k: int, seed: int, tail: str) -> SparseTargets:
    """Top-k targets where some slots are unused (id -1 / -inf, as tail draws leave them) and row 0 has no used
    slot at all."""
    targets = top_k_targets(_logits(n, v, seed, scale=3.0), k)
    unused = torch.zeros(n, k, dtype=torch.bool)
    unused[1:, -2:] = True  # the last two slots of every other row
    unused[0] = True
    ids = torch.where(unused, -1, targets.ids)
    lp = torch.where(unused, -math.inf, targets.log_probs)
    return replace(targets, ids=ids, log_probs=lp, tail=tail)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "uniform"])
@pytest.mark.parametrize(("kd_weight", "ce_weight"), [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0)])
def test_forward_kl_chunk_matches_autograd_through_the_loss_definitions(temperature, tail, kd_weight, ce_weight):
    # The fused loss's no-autograd path against autograd through sparse_token_divergence + token_cross_entropy.
    from distill.losses.dense import token_cross_entropy
    from distill.losses.sparse import sparse_forward_kl_chunk

    n, v, k = 9, 40, 6
    student = _logits(n, v, 30).requires_grad_(True)
    targets = _targets_with_unused_slots(n, v, k, 31, tail)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(32))
    objective = Objective(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)
    kd, ce, grad = sparse_forward_kl_chunk(student.detach(), targets, labels, objective, True)
    ref_kd = sparse_token_divergence(student, targets, objective).sum()
    ref_ce = token_cross_entropy(student, labels).sum()
    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-6, atol=1e-6)
    (ref_grad,) = torch.autograd.grad(kd_weight * ref_kd + ce_weight * ref_ce, student)
    assert _rel(grad, ref_grad) < 1e-5
    assert torch.isfinite(grad).all()
    # Without gradients only the sums are computed, and they are the same.
    kd2, ce2, none = sparse_forward_kl_chunk(student.detach(), targets, labels, objective, False)
    assert none is None and kd2.item() == kd.item() and ce2.item() == ce.item()


def test_forward_kl_backward_leaves_the_saved_probabilities_intact():
    # The closed-form backward works in place on a copy: running it twice (retain_graph) gives the same gradient.
    student = _logits(5, 30, 33).requires_grad_(True)
    kd = sparse_token_divergence(student, top_k_targets(_logits(5, 30, 34, scale=3.0), 4), Objective()).sum()
    (first,) = torch.autograd.grad(kd, student, retain_graph=True)
    (second,) = torch.autograd.grad(kd, student)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
