"""Distillation across tokenizers: the loss math (distill.losses.cross_tokenizer), the recipe key, and short
`distill train` runs of each mode with a byte-level student and a SentencePiece teacher trained on the same text."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import llama_config, qwen2_config, save_model, write_jsonl
from distill.cli import main
from distill.config import recipe_from_dict
from distill.errors import DistillError
from distill.losses.cross_tokenizer import (
    BucketMap,
    CrossTargets,
    aligned_divergence,
    cross_tokenizer_divergence,
    cross_tokenizer_sum,
    uld_distance,
)
from distill.losses.dense import token_divergence
from distill.losses.heads import OutputHead
from distill.losses.objective import Objective
from distill.train.cross import check_recipe
from helpers import MULTILINGUAL, byte_level_tokenizer, recipe_dict, sentencepiece_tokenizer, write_recipe

FORWARD = Objective("forward_kl")


def test_uld_hand_computed():
    """p_s = (0.5, 0.3, 0.2), p_t = (0.4, 0.6): sorted and padded, |0.5−0.6| + |0.3−0.4| + |0.2−0| = 0.4."""
    student = torch.tensor([[0.5, 0.3, 0.2]]).log()
    teacher = torch.tensor([[0.4, 0.6]]).log()
    assert uld_distance(student, teacher).item() == pytest.approx(0.4, abs=1e-6)
    assert uld_distance(teacher, student).item() == pytest.approx(0.4, abs=1e-6)  # symmetric
    # τ = 2: softmax(log p / 2) ∝ √p on both sides, times τ² = 4.
    s2, t2 = torch.tensor([0.5, 0.3, 0.2]).sqrt(), torch.tensor([0.6, 0.4]).sqrt()
    s2, t2 = s2 / s2.sum(), t2 / t2.sum()
    expected = 4 * ((s2[0] - t2[0]).abs() + (s2[1] - t2[1]).abs() + s2[2]).item()
    assert uld_distance(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_uld_is_zero_for_the_same_distribution_in_another_vocabulary():
    torch.manual_seed(0)
    teacher = torch.randn(5, 40)
    # The student: the teacher's distribution over a permuted, larger vocabulary (extra tokens of probability 0).
    student = torch.full((5, 64), float("-inf"))
    student[:, torch.randperm(64)[:40]] = teacher
    assert uld_distance(student, teacher).abs().max().item() < 1e-6
    assert uld_distance(student + 0.1 * torch.randn(5, 64), teacher).min().item() >= 0


def test_aligned_is_zero_for_the_teacher_on_the_shared_pieces():
    """Student and teacher give each shared piece the same probability and the same rest mass, over different
    vocabularies (the student has two ids for one piece, the teacher pieces the student lacks): divergence 0."""
    teacher_probs = torch.tensor([[0.4, 0.3, 0.1, 0.15, 0.05]])  # ids 0..2 shared pieces A B C, ids 3, 4 tail
    student_probs = torch.tensor([[0.2, 0.2, 0.3, 0.1, 0.2]])  # ids 0, 1 both A, 2 B, 3 C, 4 tail
    buckets = BucketMap(torch.tensor([0, 0, 1, 2, 3]), torch.tensor([0, 1, 2, 3, 3]), shared=3)
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        value = aligned_divergence(student_probs.log(), teacher_probs.log(), buckets, Objective(divergence))
        assert value.abs().item() < 1e-6, divergence
    moved = torch.tensor([[0.3, 0.1, 0.3, 0.1, 0.2]])  # A still 0.4 but B 0.3 -> the same
    assert aligned_divergence(moved.log(), teacher_probs.log(), buckets, FORWARD).abs().item() < 1e-6
    other = torch.tensor([[0.1, 0.1, 0.5, 0.1, 0.2]])  # A 0.2, B 0.5
    expected = 0.4 * torch.log(torch.tensor(0.4 / 0.2)) + 0.3 * torch.log(torch.tensor(0.3 / 0.5))
    expected += 0.1 * torch.log(torch.tensor(0.1 / 0.1)) + 0.2 * torch.log(torch.tensor(0.2 / 0.2))
    assert aligned_divergence(other.log(), teacher_probs.log(), buckets, FORWARD).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd"])
def test_aligned_on_one_vocabulary_is_the_dense_divergence(divergence):
    """With the identity map (one tokenizer on both sides) the tail is empty and `aligned` equals the usual loss."""
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 30), torch.randn(6, 30)
    identity = BucketMap(torch.arange(30), torch.arange(30), shared=30)
    objective = Objective(divergence, temperature=1.5)
    got = aligned_divergence(student, teacher, identity, objective)
    torch.testing.assert_close(got, token_divergence(student, teacher, objective), rtol=1e-5, atol=1e-6)


def test_tiny_bucket_probabilities_keep_their_log():
    """A shared piece of probability e^-120 (below float32's smallest exponential) keeps its exact log-probability."""
    logits = torch.tensor([[0.0, -120.0, -121.0]])
    buckets = BucketMap(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), shared=2)
    from distill.losses.cross_tokenizer import bucket_log_probs

    lp = bucket_log_probs(logits, buckets.student, 3, 1.0)
    assert lp[0, 1].item() == pytest.approx(-120.0 + torch.log1p(torch.exp(torch.tensor(-1.0))).item(), abs=1e-3)
    assert lp[0, 2].item() < -1e5  # the empty tail bucket: floored, no NaN


@pytest.mark.parametrize("mode", ["uld", "aligned"])
def test_gradients_flow_and_the_teacher_gets_none(mode):
    torch.manual_seed(2)
    student = torch.randn(7, 20, requires_grad=True)
    teacher = torch.randn(7, 25, requires_grad=True)
    exact = torch.tensor([True, False, True, True, False, False, True])
    buckets = BucketMap(torch.arange(20) % 15, torch.arange(25).clamp_max(15), shared=15)
    value = cross_tokenizer_divergence(student, teacher, exact, FORWARD, mode, buckets)
    value.sum().backward()
    assert value.shape == (7,) and torch.isfinite(value).all()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
    if mode == "aligned":  # rows at merged/split spans take ULD, 1:1 rows the bucketed divergence
        uld = uld_distance(student, teacher)
        aligned = aligned_divergence(student, teacher, buckets, FORWARD)
        torch.testing.assert_close(value.detach(), torch.where(exact, aligned, uld).detach())


def test_chunked_from_hidden_states_equals_the_logits_path():
    """The fused path (hidden rows + heads, chunks recomputed in backward) gives the plain path's sum and gradient."""
    torch.manual_seed(3)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(22, 8, requires_grad=True)  # 2 padding rows beyond a 20-token vocabulary
    t_hidden, t_weight = torch.randn(9, 6), torch.randn(18, 6)
    exact = torch.rand(9) > 0.5
    buckets = BucketMap(torch.arange(20) % 12, torch.arange(18) % 12, shared=12)
    for mode in ("uld", "aligned"):
        fused = cross_tokenizer_sum(
            hidden,
            CrossTargets(torch.arange(9), exact, t_hidden),
            FORWARD,
            mode,
            (20, 18),
            buckets,
            OutputHead(weight),
            OutputHead(t_weight),
            chunk_rows=4,
        )
        g_fused = torch.autograd.grad(fused, (hidden, weight))
        logits, t_logits = hidden @ weight.T, t_hidden @ t_weight.T
        plain = cross_tokenizer_sum(
            logits, CrossTargets(torch.arange(9), exact, t_logits), FORWARD, mode, (20, 18), buckets
        )
        g_plain = torch.autograd.grad(plain, (hidden, weight))
        torch.testing.assert_close(fused, plain)
        torch.testing.assert_close(g_fused, g_plain)  # the head's weight gets its gradient through the recompute


def test_no_anchors_is_a_zero_loss():
    student = torch.randn(0, 10, requires_grad=True)
    total = cross_tokenizer_sum(
        student,
        CrossTargets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), torch.randn(0, 12)),
        FORWARD,
        "uld",
        (10, 12),
    )
    assert total.item() == 0.0
    total.backward()  # a micro-batch without anchors still gives a loss backward accepts
    assert student.grad is not None and student.grad.shape == (0, 10)


def test_recipe_key():
    r = recipe_from_dict({"objective": {"cross_tokenizer": False}})  # YAML 1.1 reads a bare `off` as false
    assert r.objective.cross_tokenizer == "off"
    assert recipe_from_dict({"objective": {"cross_tokenizer": "aligned"}}).objective.cross_tokenizer == "aligned"
    with pytest.raises(DistillError, match="objective.cross_tokenizer"):
        recipe_from_dict({"objective": {"cross_tokenizer": "maybe"}})
    base = {"teacher": {"path": "t"}, "student": {"path": "s"}, "data": {"train": "x"}}
    for extra, message in (
        ({"data": {"train": "x", "packing": True}}, "data.packing=false"),
        ({"teacher": {"endpoint": "http://x/v1"}}, "teacher.endpoint is not supported"),
    ):
        r = recipe_from_dict({**base, **extra, "objective": {"cross_tokenizer": "uld"}})
        with pytest.raises(DistillError, match=message):
            check_recipe(r)
    check_recipe(recipe_from_dict({**base, "teacher": {"cache": "c"}, "objective": {"cross_tokenizer": "uld"}}))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """A Llama teacher with a SentencePiece tokenizer (BOS, byte fallback) and a Qwen2 student with a byte-level
    BPE (no BOS) of another size, both trained on the same multilingual text; and that text as training rows."""
    root = tmp_path_factory.mktemp("xtok")
    s_tok, t_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    assert len(s_tok) != len(t_tok)
    teacher = save_model(llama_config(len(t_tok), hidden=64), t_tok, root / "teacher", seed=1)
    # transformers loads the byte-level files in a qwen2 folder with one more token: rows to spare.
    student = save_model(qwen2_config(len(s_tok) + 8, hidden=32), s_tok, root / "student", seed=2)
    rows = [{"text": MULTILINGUAL[i % len(MULTILINGUAL)] + f" {i}"} for i in range(24)]
    rows += [{"prompt": "héllo", "completion": " wörld 😀"}] * 4
    return teacher, student, write_jsonl(root / "train.jsonl", rows)


def test_different_tokenizers_are_still_refused_when_off(tmp_path, pair_dirs, capsys):
    teacher, student, train = pair_dirs
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(teacher, student, train, tmp_path / "run"))
    assert main(["train", str(recipe), "--quiet"]) == 2
    assert "tokenizers differ" in capsys.readouterr().err


def divergence_to_teacher(student_dir, teacher_dir, train, mode: str) -> float:
    """The mean divergence of `mode` over the anchors of the first 8 training rows (the student's tokenization)."""
    from distill.data import build_examples, collate
    from distill.data.alignment import TokenizerPair
    from distill.models import load_model, load_tokenizer
    from distill.train.cross import cross_objective, teacher_targets

    s_tok, t_tok = load_tokenizer(str(student_dir), "student"), load_tokenizer(str(teacher_dir), "teacher")
    examples = build_examples(str(train), s_tok, 48)[0][:8]
    pair = TokenizerPair(s_tok, t_tok)
    batch = collate(examples, s_tok.pad_token_id)
    batch.update(pair.batch(examples, batch["input_ids"].shape[1]))
    student = load_model(str(student_dir), "student", torch.float32).eval()
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    targets = teacher_targets(teacher, batch, False, torch.device("cpu"))
    c = cross_objective(pair, mode, torch.device("cpu"))
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, targets.student_index)
        total = cross_tokenizer_sum(rows, targets, FORWARD, mode, (len(s_tok), c.teacher_vocab), c.buckets)
    return float(total) / len(targets.student_index)


@pytest.mark.parametrize(
    "mode, fused, on_policy",
    [
        ("uld", False, 0.0),
        pytest.param("aligned", True, 0.0, marks=pytest.mark.slow),
        pytest.param("aligned", False, 0.5, marks=pytest.mark.slow),  # on-policy: sampling costs about 20 s
    ],
)
def test_distill_train_across_tokenizers(tmp_path, pair_dirs, mode, fused, on_policy):
    """A short `distill train` of each mode (fused and plain, one with on-policy steps): the divergence is logged,
    finite and falls, the student's weights change."""
    from safetensors.torch import load_file

    from helpers import final_weights

    teacher, student, train = pair_dirs
    out = tmp_path / "run"
    objective = {"cross_tokenizer": mode, "fused": fused, "ce_weight": 0.0}
    report = {"enabled": mode == "uld", "speed": False, "draft": False}  # one run also writes its report
    if on_policy:
        objective["on_policy"] = {"lambda": on_policy, "max_new_tokens": 6}
    training = {"steps": 6, "lr": 2e-2, "save_every": 6, "eval_every": 6}
    content = recipe_dict(teacher, student, train, out, objective=objective, training=training, report=report)
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [e["kd_loss"] for e in events if e["event"] == "train"]
    assert len(kd) == 6 and all(v > 0 and v == v for v in kd)
    if not on_policy:  # closer to the teacher on a fixed batch of the training text
        assert divergence_to_teacher(out / "student", teacher, train, mode) < divergence_to_teacher(
            student, teacher, train, mode
        )
    if report["enabled"]:
        models = json.loads((out / "report.json").read_text())["models"]
        assert models["student"]["bits_per_byte"] > 0 and models["teacher"]["bits_per_byte"] > 0
        assert 0 < models["student"]["aligned_share"] < 1
    before = load_file(str(student / "model.safetensors"))
    after = final_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


# ---------------------------------------------------------------- the report across tokenizers


def test_report_across_tokenizers(pair_dirs):
    """Bits per byte and agreement where spans align: a model scored against itself (same tokenizer) agrees
    everywhere with KL 0 and the teacher's bits per byte; the byte-level student is scored on the same text."""
    from distill.report.evaluate import evaluate_models

    teacher, student, train = pair_dirs
    models = {"student": str(student), "itself": str(teacher)}
    report = evaluate_models(
        str(teacher), models, str(train), None, speed=False, cross_tokenizer=True, show_progress=False, log=print
    )
    t, same, s = (report["models"][k] for k in ("teacher", "itself", "student"))
    assert same["agreement"] == 1.0 and abs(same["kl_to_teacher"]) < 1e-6
    # Not all 1:1: prompt/completion rows are tokenized in two parts, the teacher reads their text as one.
    assert 0.95 < same["aligned_share"] <= 1.0
    assert same["bits_per_byte"] == pytest.approx(t["bits_per_byte"])
    # Beside itself the teacher's tokens count where they lie inside the counted bytes (whole at the boundaries).
    assert same["teacher_bits_per_byte"] == pytest.approx(same["bits_per_byte"], rel=0.05)
    assert 0.0 < s["aligned_share"] < 1.0 and 0.0 <= s["agreement"] <= 1.0 and s["kl_to_teacher"] > 0
    assert s["bits_per_byte"] > 0 and s["teacher_bits_per_byte"] > 0
    assert report["retention"]["student"]["bits_per_byte"] == pytest.approx(
        s["teacher_bits_per_byte"] / s["bits_per_byte"]
    )
    assert report["retention"]["student"]["cross_entropy"] is None  # nats per token of another tokenizer


@pytest.mark.slow  # the usual report's whole evaluation beside the cross-tokenizer one
def test_bits_per_byte_across_tokenizers_is_the_one_tokenizer_definition(teacher_dir, student_dir, eval_file):
    """Where teacher and student share a tokenizer, the tokenizer-free path gives the usual report's bits per byte."""
    from distill.report.evaluate import evaluate_models

    quiet = {"speed": False, "show_progress": False, "log": lambda _: None}
    usual = evaluate_models(str(teacher_dir), {"student": str(student_dir)}, str(eval_file), None, draft=False, **quiet)
    across = evaluate_models(
        str(teacher_dir), {"student": str(student_dir)}, str(eval_file), None, cross_tokenizer=True, **quiet
    )
    for name in ("teacher", "student"):
        assert across["models"][name]["bits_per_byte"] == pytest.approx(usual["models"][name]["bits_per_byte"])
    assert across["models"]["student"]["agreement"] == pytest.approx(usual["models"]["student"]["agreement"])
    assert across["models"]["student"]["kl_to_teacher"] == pytest.approx(usual["models"]["student"]["kl_to_teacher"])
