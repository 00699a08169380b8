"""teacher.dtype: auto runs the teacher in bfloat16 on a CPU with native bf16 (and on GPUs); its losses stay close.

The tolerance is stated once: for every divergence, the loss from a bf16 teacher is within BF16_RTOL of the loss
from the same teacher in float32, and the student's gradient points the same way (cosine > BF16_GRAD_COSINE; TVD,
whose gradient is a sign, > TVD_GRAD_COSINE). The teacher here has peaked distributions (large initial weights:
top-1 probabilities well above uniform), so the bf16 rounding of its logits matters as it would for a trained
model; a near-uniform random teacher would pass anything.
"""

from __future__ import annotations

import pytest
import torch

from conftest import llama_config
from distill import models as model_loading
from distill.losses.dense import loss_sums
from distill.losses.fused import fused_loss_sums
from distill.losses.heads import backbone_hidden_states, output_head
from distill.losses.objective import DIVERGENCES, Objective

BF16_RTOL = 0.005  # relative difference of the divergence sum, bf16 teacher vs fp32 teacher (measured <= 3e-4)
BF16_GRAD_COSINE = 0.999  # cosine between the student's logit gradients of the two (measured >= 0.9995)
# TVD's gradient is sign(p_s - p_t): tokens where the two are nearly equal flip sign under rounding (measured 0.992).
TVD_GRAD_COSINE = 0.98

VOCAB = 512


@pytest.fixture(scope="module")
def peaked_pair():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(llama_config(VOCAB, hidden=64, layers=2, initializer_range=0.3)).eval()
    teacher_bf16 = AutoModelForCausalLM.from_config(llama_config(VOCAB, hidden=64, layers=2)).eval()
    teacher_bf16.load_state_dict(teacher.state_dict())
    teacher_bf16.to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (4, 24))
    with torch.no_grad():
        probs = teacher(input_ids=ids).logits.softmax(-1)
    assert probs.max(-1).values.mean() > 20 / VOCAB  # peaked, not near-uniform: the test can see rounding
    torch.manual_seed(1)
    student_logits = torch.randn(4, 23, VOCAB) * 2
    labels = ids[:, 1:].clone()
    labels[:, :3] = -100  # a prompt: not counted
    return teacher, teacher_bf16, ids, student_logits, labels


def _kd_and_grad(logits, teacher_logits, labels, objective):
    student = logits.clone().requires_grad_(True)
    kd, _ = loss_sums(student, teacher_logits, labels, objective)
    kd.backward()
    return kd.detach(), student.grad.flatten()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bf16_teacher_divergence_stays_within_tolerance(peaked_pair, divergence):
    teacher, teacher_bf16, ids, student_logits, labels = peaked_pair
    objective = Objective(divergence=divergence, temperature=2.0 if divergence == "forward_kl" else 1.0)
    with torch.no_grad():
        reference = teacher(input_ids=ids).logits[:, :-1]
        rounded = teacher_bf16(input_ids=ids).logits[:, :-1]
    assert rounded.dtype == torch.bfloat16
    kd32, grad32 = _kd_and_grad(student_logits, reference, labels, objective)
    kd16, grad16 = _kd_and_grad(student_logits, rounded, labels, objective)
    assert kd32 > 0
    assert abs(kd16 - kd32) <= BF16_RTOL * kd32, (kd16, kd32)
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > (TVD_GRAD_COSINE if divergence == "tvd" else BF16_GRAD_COSINE)


def test_bf16_teacher_on_the_fused_path_matches_its_dense_value(peaked_pair):
    """The fused loss takes the bf16 teacher's hidden states and head as they are (matmul in bf16, the rest in
    float32): the same value as the dense path on the bf16 teacher's logits, and within tolerance of fp32."""
    teacher, teacher_bf16, ids, student_logits, labels = peaked_pair
    objective = Objective(divergence="forward_kl")
    torch.manual_seed(2)
    student_hidden = torch.randn(4, 23, 64)
    student_head = output_head(teacher)  # any fp32 head: only the teacher's dtype is under test
    results = {}
    for name, model in (("fp32", teacher), ("bf16", teacher_bf16)):
        with torch.no_grad():
            hidden = backbone_hidden_states(model, ids)[:, :-1]
            dense_teacher = model(input_ids=ids).logits[:, :-1]
        _, kd, _ = fused_loss_sums(
            student_hidden, student_head, labels, objective=objective, teacher_hidden=hidden,
            teacher_head=output_head(model),
        )  # fmt: skip
        student_logits = student_hidden @ student_head.weight.t()
        dense, _ = loss_sums(student_logits, dense_teacher, labels, objective)
        assert torch.allclose(kd, dense, rtol=1e-3), (name, kd, dense)
        results[name] = kd
    assert abs(results["bf16"] - results["fp32"]) <= BF16_RTOL * results["fp32"]


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_teacher_dtype_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(model_loading, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert model_loading.teacher_dtype("auto", cpu) == expected
    assert model_loading.teacher_dtype("float32", cpu) == torch.float32  # an explicit dtype is kept
    assert model_loading.resolve_dtype("auto", cpu) == torch.float32  # students and evaluation stay float32


def test_native_bf16_probe_answers_a_bool():
    assert isinstance(model_loading.cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("native", [True, False])
def test_a_run_with_teacher_dtype_auto_says_when_it_picks_bf16(
    monkeypatch, tmp_path, teacher_dir, student_dir, train_file, native
):
    from distill.config import recipe_from_dict
    from distill.train.loop import train
    from helpers import recipe_dict

    monkeypatch.setattr(model_loading, "cpu_has_native_bf16", lambda: native)
    loaded = []
    real_load = model_loading.load_model

    def record(source, role, dtype, *args, **kwargs):
        loaded.append((role, dtype))
        return real_load(source, role, dtype, *args, **kwargs)

    monkeypatch.setattr("distill.train.setup.load_model", record)
    lines = []
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", teacher={"dtype": "auto"})
    content["training"].update(steps=1, save_every=1, eval_every=1)
    train(recipe_from_dict(content), log=lines.append, show_progress=False)
    assert ("teacher", torch.bfloat16 if native else torch.float32) in loaded
    assert any("teacher in bfloat16" in line for line in lines) == native
