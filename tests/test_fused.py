"""The fused linear + divergence loss against the dense reference (full logits, `losses.loss_sums`, autograd)."""

from __future__ import annotations

import pytest
import torch

from conftest import llama_config, qwen2_config
from distill.losses.dense import loss_sums
from distill.losses.fused import chunk_rows_for, fused_loss_sums
from distill.losses.heads import OutputHead, backbone_hidden_states, output_head, verify_output_head
from distill.losses.objective import Objective
from distill.losses.sparse import sparse_loss_sums, top_k_targets

OBJECTIVES = [
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 1.0, 0.1),
    ("skew_forward_kl", 0.5, 0.2),
    ("skew_reverse_kl", 0.5, 0.2),
    ("tvd", 0.5, 0.1),
]
TOL = 1e-5
FORWARD_KL = Objective()  # forward KL at τ = 1, kd_weight 1, no cross-entropy term


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in norm; the reference is b."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _problem(
    n=37, h=16, ht=24, vocab=50, s_rows=53, t_rows=55, bias=True, s_post=(0.7, 3.0), t_post=(1.3, None), seed=0
):
    """Random hidden states and heads; student and teacher heads padded beyond `vocab` by different amounts.

    Labels are masked on rows 8..23, so with 8-row chunks two whole chunks hold no counted token.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = (torch.randn(s_rows, h, generator=g) / h**0.5).requires_grad_(True)
    b = (torch.randn(s_rows, generator=g) * 0.5).requires_grad_(True) if bias else None
    t_hidden = torch.randn(n, ht, generator=g)
    t_weight = torch.randn(t_rows, ht, generator=g) * 2 / ht**0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[8:24] = -100
    student = OutputHead(weight, b, logit_scale=s_post[0], softcap=s_post[1])
    teacher = OutputHead(t_weight, None, logit_scale=t_post[0], softcap=t_post[1])
    return hidden, student, labels, t_hidden, teacher


def _dense(
    hidden,
    student,
    labels,
    vocab,
    teacher_hidden=None,
    teacher=None,
    sparse=None,
    objective=FORWARD_KL,
    normalizer=1.0,
    vocab_size=None,
):
    """Reference: full logits, the shared loss definitions, plain autograd."""
    logits = student.logits(hidden)[..., :vocab]  # (N, vocab)
    if sparse is not None:
        kd, ce = sparse_loss_sums(logits, sparse, labels, objective, vocab_size=vocab_size)
    else:
        teacher_logits = teacher.logits(teacher_hidden)[..., :vocab] if teacher is not None else None  # (N, vocab)
        kd, ce = loss_sums(logits, teacher_logits, labels, objective)
    return (objective.kd_weight * kd + objective.ce_weight * ce) / normalizer, kd, ce


def _fused(hidden, student, labels, objective, t_hidden=None, teacher=None, **kwargs):
    """`fused_loss_sums` on a `_problem` (vocabulary 50), with its teacher when one is given."""
    return fused_loss_sums(
        hidden,
        student,
        labels,
        objective=objective,
        teacher_hidden=t_hidden,
        teacher_head=teacher,
        vocab_size=50,
        **kwargs,
    )


def _params(hidden, head):
    return [hidden, head.weight] + ([head.bias] if head.bias is not None else [])


def _check(fused, dense, params, tol=TOL):
    loss, kd, ce = fused
    ref_loss, ref_kd, ref_ce = dense
    assert loss.shape == () and loss.dtype == torch.float32
    assert not kd.requires_grad and not ce.requires_grad
    for got, ref in ((loss, ref_loss), (kd, ref_kd), (ce, ref_ce)):
        assert abs(got.item() - ref.item()) <= tol * max(abs(ref.item()), 1e-6), (got.item(), ref.item())
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for name, got, ref in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert _rel(got, ref) <= tol, (name, _rel(got, ref))


@pytest.mark.parametrize(("divergence", "beta", "skew"), OBJECTIVES)
def test_every_objective_matches_dense(divergence, beta, skew):
    # Everything at once: temperature ≠ 1, hard-label term, masked chunks, N not a multiple of the chunk,
    # padded vocabularies of different sizes, bias, logit scale and softcap on different sides.
    hidden, student, labels, t_hidden, teacher = _problem()
    objective = Objective(divergence, beta, skew, temperature=2.0, ce_weight=0.3)
    fused = _fused(hidden, student, labels, objective, t_hidden, teacher, chunk_rows=8, normalizer=7.0)
    dense = _dense(hidden, student, labels, 50, t_hidden, teacher, objective=objective, normalizer=7.0)
    _check(fused, dense, _params(hidden, student))
    assert dense[1].item() > 0.01  # the comparison is not between two zeros


@pytest.mark.parametrize(("divergence", "beta", "skew"), [("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1)])
@pytest.mark.parametrize(("kd_weight", "ce_weight"), [(0.8, 0.0), (0.8, 0.5), (0.0, 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_plain_head_closed_form(divergence, beta, skew, kd_weight, ce_weight, temperature):
    # No scale/softcap/bias: the closed-form path works in place on its (n, V) buffers; at τ = 1 the student's
    # log-probs serve the cross-entropy too and the hard-label gradient is folded into the divergence's pass.
    hidden, student, labels, t_hidden, teacher = _problem(bias=False, s_post=(1.0, None), t_post=(1.0, None))
    objective = Objective(divergence, beta, skew, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)
    fused = _fused(hidden, student, labels, objective, t_hidden, teacher, chunk_rows=5)
    dense = _dense(hidden, student, labels, 50, t_hidden, teacher, objective=objective)
    _check(fused, dense, _params(hidden, student))


def test_hard_labels_only():
    hidden, student, labels, _, _ = _problem()
    objective = Objective(temperature=3.0, ce_weight=1.0)
    fused = _fused(hidden, student, labels, objective, chunk_rows=8)
    dense = _dense(hidden, student, labels, 50, objective=objective)
    assert fused[1].item() == 0.0
    _check(fused, dense, _params(hidden, student))


@pytest.mark.parametrize(("divergence", "beta", "skew"), OBJECTIVES)
def test_sparse_targets_match_sparse_reference(divergence, beta, skew):
    hidden, student, labels, t_hidden, teacher = _problem()
    targets = top_k_targets(teacher.logits(t_hidden), 6, vocab_size=50)
    objective = Objective(divergence, beta, skew, temperature=1.5, ce_weight=0.2)
    fused = _fused(hidden, student, labels, objective, sparse=targets, chunk_rows=8)
    dense = _dense(hidden, student, labels, 50, sparse=targets, objective=objective, vocab_size=50)
    _check(fused, dense, _params(hidden, student))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_chunk_size_does_not_change_the_result(chunk_rows):
    hidden, student, labels, t_hidden, teacher = _problem()
    objective = Objective("jsd", beta=0.3, temperature=1.7, ce_weight=0.1)
    fused = _fused(
        hidden, student, labels, objective, t_hidden, teacher, chunk_rows=chunk_rows, memory_budget_bytes=4096
    )
    dense = _dense(hidden, student, labels, 50, t_hidden, teacher, objective=objective)
    _check(fused, dense, _params(hidden, student))


def test_batched_shapes_and_tensor_normalizer():
    hidden, student, labels, t_hidden, teacher = _problem(n=36)
    hidden3 = hidden.detach().reshape(4, 9, -1).requires_grad_(True)  # (B, T, H)
    normalizer = (labels != -100).sum()
    t_hidden3 = t_hidden.reshape(4, 9, -1)
    fused = _fused(
        hidden3, student, labels.reshape(4, 9), FORWARD_KL, t_hidden3, teacher, normalizer=normalizer, chunk_rows=8
    )
    dense = _dense(hidden3, student, labels.reshape(4, 9), 50, t_hidden3, teacher, normalizer=20.0)
    assert normalizer.item() == 20
    _check(fused, dense, _params(hidden3, student))


def test_all_tokens_masked_gives_zero_loss_and_gradients():
    hidden, student, labels, t_hidden, teacher = _problem()
    labels = torch.full_like(labels, -100)
    objective = Objective(ce_weight=1.0)
    # normalizer 0: clamped, so the loss is 0 rather than NaN
    loss, kd, ce = _fused(hidden, student, labels, objective, t_hidden, teacher, normalizer=(labels != -100).sum())
    assert loss.item() == 0.0 and kd.item() == 0.0 and ce.item() == 0.0
    for grad in torch.autograd.grad(loss, _params(hidden, student)):
        assert torch.count_nonzero(grad) == 0


def test_teacher_gets_no_gradient_and_no_grad_mode_works():
    hidden, student, labels, t_hidden, teacher = _problem()
    t_hidden.requires_grad_(True)
    teacher.weight.requires_grad_(True)
    loss, _, _ = _fused(hidden, student, labels, FORWARD_KL, t_hidden, teacher)
    loss.backward()
    assert t_hidden.grad is None and teacher.weight.grad is None
    assert hidden.grad is not None and student.weight.grad is not None
    with torch.no_grad():
        eval_loss, _, _ = _fused(hidden, student, labels, FORWARD_KL, t_hidden, teacher)
    assert not eval_loss.requires_grad
    assert eval_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_frozen_head_gets_no_gradient():
    hidden, student, labels, t_hidden, teacher = _problem()
    student.weight.requires_grad_(False)
    student.bias.requires_grad_(False)
    loss, _, _ = _fused(hidden, student, labels, FORWARD_KL, t_hidden, teacher)
    (grad,) = torch.autograd.grad(loss, [hidden])
    dense = _dense(hidden, student, labels, 50, t_hidden, teacher)
    assert _rel(grad, torch.autograd.grad(dense[0], [hidden])[0]) <= TOL


def test_bf16_inputs_are_close_to_float32_reference():
    hidden, student, labels, t_hidden, teacher = _problem(n=64)
    cast = {"dtype": torch.bfloat16}
    h16 = hidden.detach().to(**cast).requires_grad_(True)
    w16 = student.weight.detach().to(**cast).requires_grad_(True)
    b16 = student.bias.detach().to(**cast).requires_grad_(True)
    student16 = OutputHead(w16, b16, student.logit_scale, student.softcap)
    teacher16 = OutputHead(teacher.weight.to(**cast), None, teacher.logit_scale, teacher.softcap)
    t16 = t_hidden.to(**cast)
    objective = Objective("jsd", beta=0.5, temperature=2.0, ce_weight=0.3)
    loss, _, _ = _fused(h16, student16, labels, objective, t16, teacher16, chunk_rows=8)
    grads = torch.autograd.grad(loss, [h16, w16, b16])
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    # Reference in float32 on the very same (bf16-representable) values.
    h32, w32, b32 = (x.detach().float().requires_grad_(True) for x in (h16, w16, b16))
    student32 = OutputHead(w32, b32, student.logit_scale, student.softcap)
    teacher32 = OutputHead(teacher16.weight.float(), None, teacher.logit_scale, teacher.softcap)
    ref_loss = _dense(h32, student32, labels, 50, t16.float(), teacher32, objective=objective)[0]
    ref_grads = torch.autograd.grad(ref_loss, [h32, w32, b32])
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert _rel(got, ref) < 1e-2


def test_tied_embeddings_gradient_reaches_shared_weight_once():
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(llama_config(40, hidden=32, layers=1, tie_word_embeddings=True))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 40, (2, 9))
    labels = ids[:, 1:].clone()  # (2, 8)
    labels[0, :3] = -100
    teacher_logits = torch.randn(2, 8, 40) * 2  # (2, 8, 40)

    ref_kd, ref_ce = loss_sums(model(ids).logits[:, :-1], teacher_logits, labels, Objective("forward_kl"))
    ref_grads = torch.autograd.grad(ref_kd + 0.5 * ref_ce, list(model.parameters()))

    hidden = backbone_hidden_states(model, ids)[:, :-1]  # (2, 8, H)
    # A teacher head that reproduces the fixed teacher logits exactly: identity weight on one-hot "hidden states".
    teacher = OutputHead(torch.eye(40))
    loss, _, _ = fused_loss_sums(
        hidden,
        output_head(model),
        labels,
        objective=Objective(ce_weight=0.5),
        teacher_hidden=teacher_logits,
        teacher_head=teacher,
    )
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert len(grads) == len(ref_grads)  # the shared matrix is one parameter
    for (name, _), got, ref in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert _rel(got, ref) <= TOL, name


def test_end_to_end_tiny_llama_teacher_and_qwen2_student():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    teacher_model = AutoModelForCausalLM.from_config(llama_config(64 + 8, hidden=32, layers=1)).eval()
    student_model = AutoModelForCausalLM.from_config(qwen2_config(64, hidden=16, layers=1))
    ids = torch.randint(0, 64, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # right padding
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (3, 10)
    objective = Objective("skew_reverse_kl", skew=0.1, temperature=1.5, ce_weight=0.2)
    normalizer = (labels != -100).sum()

    for model in (teacher_model, student_model):
        verify_output_head(model, ids, mask)
        hidden = backbone_hidden_states(model, ids, mask)
        assert hidden.shape == (3, 11, model.config.hidden_size)

    with torch.no_grad():
        teacher_logits = teacher_model(ids, attention_mask=mask).logits[:, :-1, :64]  # (3, 10, 64)
        teacher_hidden = backbone_hidden_states(teacher_model, ids, mask)[:, :-1]  # (3, 10, 32)
    kd, ce = loss_sums(
        student_model(ids, attention_mask=mask).logits[:, :-1],
        teacher_logits,
        labels,
        objective,
    )
    ref_loss = (kd + 0.2 * ce) / normalizer
    ref_grads = torch.autograd.grad(ref_loss, list(student_model.parameters()))

    loss, _, _ = fused_loss_sums(
        backbone_hidden_states(student_model, ids, mask)[:, :-1],
        output_head(student_model),
        labels,
        objective=objective,
        teacher_hidden=teacher_hidden,
        teacher_head=output_head(teacher_model),
        vocab_size=64,
        normalizer=normalizer,
    )
    assert loss.item() == pytest.approx(ref_loss.item(), rel=TOL)
    grads = torch.autograd.grad(loss, list(student_model.parameters()))
    for (name, _), got, ref in zip(student_model.named_parameters(), grads, ref_grads, strict=True):
        assert _rel(got, ref) <= TOL, name


def test_heads_reproduce_model_logits_for_scaled_and_softcapped_architectures():
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    common = dict(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cases = [
        (Gemma2Config(**common, final_logit_softcapping=0.5), 1.0, 0.5),
        (CohereConfig(**common, logit_scale=0.3), 0.3, None),
        (GraniteConfig(**common, logits_scaling=4.0), 0.25, None),
    ]
    ids = torch.randint(0, 48, (2, 6))
    for config, scale, softcap in cases:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        head = output_head(model)
        assert head.logit_scale == pytest.approx(scale) and head.softcap == softcap
        with torch.no_grad():
            assert torch.allclose(head.logits(backbone_hidden_states(model, ids)), model(ids).logits, atol=1e-6)
        verify_output_head(model, ids)
        with pytest.raises(ValueError, match="does not reproduce"):
            verify_output_head(model, ids, head=OutputHead(head.weight, head.bias, scale * 3, softcap))


def test_chunk_rows_follow_the_budget():
    small = chunk_rows_for(32768, 64 * 2**20)
    large = chunk_rows_for(32768, 512 * 2**20)
    assert small % 8 == 0 and large % 8 == 0 and 8 <= small < large
    assert chunk_rows_for(32768, 1) == 8  # never below one small block, even if the budget is exceeded
    assert chunk_rows_for(32768, 256 * 2**20, "jsd") < chunk_rows_for(32768, 256 * 2**20, "forward_kl")


def test_bad_arguments_are_rejected():
    hidden, student, labels, t_hidden, teacher = _problem()
    with pytest.raises(ValueError, match="go together"):
        fused_loss_sums(hidden, student, labels, objective=Objective(), teacher_hidden=t_hidden)
    with pytest.raises(ValueError, match="labels"):
        fused_loss_sums(hidden, student, labels[:-1], objective=Objective())
    with pytest.raises(ValueError, match="exceeds"):
        fused_loss_sums(hidden, student, labels, objective=Objective(), vocab_size=54)
    with pytest.raises(ValueError, match="divergence"):
        fused_loss_sums(hidden, student, labels, objective=Objective(divergence="kl"))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "uniform"])
@pytest.mark.parametrize(("kd_weight", "ce_weight"), [(1.0, 0.0), (1.0, 0.5), (0.0, 1.0)])
def test_sparse_forward_kl_closed_form_matches_sparse_reference(temperature, tail, kd_weight, ce_weight):
    # The sparse forward-KL chunk skips autograd and shares one log-softmax with the cross-entropy; at τ = 1 the
    # cross-entropy's gradient is folded into the divergence's pass.
    from dataclasses import replace

    hidden, student, labels, t_hidden, teacher = _problem()
    targets = replace(top_k_targets(teacher.logits(t_hidden), 6, vocab_size=50), tail=tail)
    objective = Objective(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)
    fused = _fused(hidden, student, labels, objective, sparse=targets, chunk_rows=8)
    dense = _dense(hidden, student, labels, 50, sparse=targets, objective=objective, vocab_size=50)
    _check(fused, dense, _params(hidden, student))
