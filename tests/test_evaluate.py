"""Evaluation metrics: per-token values against a dense reference, whole-model results against a reference
computed straight from the models, bits-per-byte bytes, retention/speed-up arithmetic, timing, exact match."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import train_tokenizer, write_jsonl
from distill.data import Example, build_examples, collate
from distill.errors import DistillError
from distill.report.evaluate import evaluate_models, parse_model_arguments
from distill.report.generation import exact_match, normalize_answer
from distill.report.quality import counted_bytes, token_metrics
from distill.report.retention import retention_of, speedup_of
from distill.report.speed import SpeedSettings, measure_speed

TINY_SPEED = SpeedSettings(runs=1, warmup=0, prompt_tokens=8, new_tokens=3, batch_size=2)


def _reference(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list]:
    """Token-by-token float64 loops: the plainest possible statement of each metric."""
    out = {"cross_entropy": [], "kl_to_teacher": [], "correct": [], "agreement": []}
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            target = int(labels[b, t])
            if target == -100:
                continue
            lp = torch.log_softmax(logits[b, t].double(), -1)
            tp = torch.log_softmax(teacher_logits[b, t].double(), -1)
            out["cross_entropy"].append(float(-lp[target]))
            out["kl_to_teacher"].append(float((tp.exp() * (tp - lp)).sum()))
            out["correct"].append(int(logits[b, t].argmax()) == target)
            out["agreement"].append(int(logits[b, t].argmax()) == int(teacher_logits[b, t].argmax()))
    return out


def _close(values: torch.Tensor, reference: list[float]) -> bool:
    return torch.allclose(values.double(), torch.tensor(reference, dtype=torch.float64), atol=1e-5)


def test_token_metrics_match_dense_reference():
    torch.manual_seed(0)
    logits, teacher = torch.randn(3, 7, 13) * 3, torch.randn(3, 7, 13) * 3  # (B, T, V)
    labels = torch.randint(0, 13, (3, 7))  # (B, T)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    labels[1, 1] = int(logits[1, 1].argmax())  # at least one correct prediction
    got = token_metrics(logits, labels, teacher, chunk_tokens=4)  # chunking must not change anything
    ref = _reference(logits, teacher, labels)
    n = int((labels != -100).sum())
    for name in ("cross_entropy", "kl_to_teacher", "correct", "agreement", "index", "prediction"):
        assert got[name].shape == (n,), name
    assert torch.allclose(
        got["cross_entropy"].double(), torch.tensor(ref["cross_entropy"], dtype=torch.float64), atol=1e-5
    )
    assert torch.allclose(
        got["kl_to_teacher"].double(), torch.tensor(ref["kl_to_teacher"], dtype=torch.float64), atol=1e-5
    )
    assert got["correct"].tolist() == ref["correct"] and any(ref["correct"])
    assert got["agreement"].tolist() == ref["agreement"]


def test_token_metrics_of_teacher_against_itself():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    got = token_metrics(logits, labels, logits)
    assert torch.all(got["kl_to_teacher"] == 0)
    assert bool(got["agreement"].all())


def test_token_metrics_with_bfloat16_student():
    torch.manual_seed(2)
    teacher = torch.randn(2, 5, 11)
    student = (teacher + 0.1 * torch.randn(2, 5, 11)).bfloat16()
    labels = torch.randint(0, 11, (2, 5))
    got = token_metrics(student, labels, teacher)
    ref = _reference(student.float(), teacher, labels)
    assert got["kl_to_teacher"].dtype == torch.float32
    assert torch.allclose(
        got["kl_to_teacher"].double(), torch.tensor(ref["kl_to_teacher"], dtype=torch.float64), atol=1e-5
    )


def _model_reference(teacher_dir, student_dir, data, tokenizer):
    """Each sequence alone (batch 1, no padding), float64 log-softmax over the tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM

    vocab = len(tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    examples, _ = build_examples(data, tokenizer, 256)
    sums = {"cross_entropy": 0.0, "kl_to_teacher": 0.0, "correct": 0, "agreement": 0, "teacher_ce": 0.0}
    count = 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            s_logits = student(input_ids=ids).logits[0, :, :vocab].double()  # (T, V)
            t_logits = teacher(input_ids=ids).logits[0, :, :vocab].double()  # (T, V)
            for i in range(1, len(e.input_ids)):
                if not e.loss_mask[i]:
                    continue
                target = e.input_ids[i]
                s_lp, t_lp = torch.log_softmax(s_logits[i - 1], -1), torch.log_softmax(t_logits[i - 1], -1)
                sums["cross_entropy"] += float(-s_lp[target])
                sums["teacher_ce"] += float(-t_lp[target])
                sums["kl_to_teacher"] += float((t_lp.exp() * (t_lp - s_lp)).sum())
                sums["correct"] += int(s_lp.argmax()) == target
                sums["agreement"] += int(s_lp.argmax()) == int(t_lp.argmax())
                count += 1
    return {k: v / count for k, v in sums.items()}, count


def test_evaluate_models_equals_reference(teacher_dir, student_dir, eval_file, tokenizer):
    report = evaluate_models(
        str(teacher_dir),
        {"student": str(student_dir)},
        str(eval_file),
        None,
        batch_size=3,  # padded batches with prompt rows: exclusion must match the one-by-one reference
        speed=False,
        show_progress=False,
        log=lambda *_: None,
    )
    ref, count = _model_reference(teacher_dir, student_dir, eval_file, tokenizer)
    student, teacher = report["models"]["student"], report["models"]["teacher"]
    assert student["tokens"] == teacher["tokens"] == count
    for name in ("cross_entropy", "kl_to_teacher"):
        assert student[name] == pytest.approx(ref[name], abs=1e-4), name
    # Tiny random models are close to each other, where KL's two directions differ only at third order; a
    # relative bound also tells them apart.
    assert student["kl_to_teacher"] == pytest.approx(ref["kl_to_teacher"], rel=1e-4)
    assert student["top1_accuracy"] == pytest.approx(ref["correct"], abs=1e-9)
    assert student["agreement"] == pytest.approx(ref["agreement"], abs=1e-9)
    assert teacher["cross_entropy"] == pytest.approx(ref["teacher_ce"], abs=1e-4)
    assert teacher["kl_to_teacher"] == 0.0 and teacher["agreement"] == 1.0
    assert student["perplexity"] == pytest.approx(math.exp(student["cross_entropy"]))
    bytes_ = report["data"]["counted_bytes"]
    assert student["bits_per_byte"] == pytest.approx(student["cross_entropy"] * count / math.log(2) / bytes_)
    p = student["kl_to_teacher_percentiles"]
    assert 0 <= p["p50"] <= p["p90"] <= p["p99"] <= student["kl_to_teacher_max"]
    worst = student["most_divergent_tokens"]
    assert worst and worst[0]["kl"] == pytest.approx(student["kl_to_teacher_max"])
    assert report["retention"]["student"]["cross_entropy"] == pytest.approx(ref["teacher_ce"] / ref["cross_entropy"])


def test_student_in_another_dtype(teacher_dir, student_dir, eval_file):
    kwargs = dict(speed=False, show_progress=False, log=lambda *_: None)
    models = {"student": str(student_dir), "half": {"path": str(student_dir), "dtype": "bfloat16"}}
    report = evaluate_models(str(teacher_dir), models, str(eval_file), None, **kwargs)
    full, half = report["models"]["student"], report["models"]["half"]
    assert half["dtype"] == "bfloat16" and full["dtype"] == "float32"
    assert half["cross_entropy"] == pytest.approx(full["cross_entropy"], rel=2e-2)
    assert set(report["retention"]) == {"student", "half"}


def test_counted_bytes_follow_the_definition(tokenizer):
    text = "café au lait, hello world"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    whole = Example(ids, [True] * len(ids))
    # Token 0 is never a target; EOS is a target but decodes to no text.
    first = len(tokenizer.decode(ids[:1], skip_special_tokens=True).encode("utf-8"))
    assert counted_bytes([whole], tokenizer) == len(text.encode("utf-8")) - first
    prompt = tokenizer("hello", add_special_tokens=True)["input_ids"]
    completion = tokenizer(" wörld", add_special_tokens=False)["input_ids"]
    split = Example(prompt + completion, [False] * len(prompt) + [True] * len(completion))
    assert counted_bytes([split], tokenizer) == len(" wörld".encode())
    assert counted_bytes([whole, split], tokenizer) == counted_bytes([whole], tokenizer) + len(" wörld".encode())


def test_retention_and_speedup_definitions():
    teacher = {"top1_accuracy": 0.5, "cross_entropy": 2.0, "agreement": 1.0, "bits_per_byte": 1.0, "params": 1000}
    teacher.update(decode_tokens_per_s=10.0, prefill_tokens_per_s=100.0)
    student = {"top1_accuracy": 0.4, "cross_entropy": 2.5, "agreement": 0.8, "bits_per_byte": 1.25, "params": 250}
    student.update(decode_tokens_per_s=30.0, prefill_tokens_per_s=200.0)
    retention = retention_of(student, teacher)
    assert retention["top1_accuracy"] == pytest.approx(0.8)
    assert retention["cross_entropy"] == pytest.approx(0.8)  # CE_teacher / CE_student
    assert retention["agreement"] == pytest.approx(0.8)
    assert retention["bits_per_byte"] == pytest.approx(0.8)
    speedup = speedup_of(student, teacher)
    assert speedup["decode"] == pytest.approx(3.0) and speedup["params"] == pytest.approx(4.0)
    assert retention_of({**student, "top1_accuracy": 0.1}, {**teacher, "top1_accuracy": 0.0})["top1_accuracy"] is None


def test_measure_speed_reports_both_batches(student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    model.train()
    result = measure_speed(model, 300, TINY_SPEED)
    assert [b["batch_size"] for b in result["batches"]] == [1, 2]
    for b in result["batches"]:
        assert b["prefill_tokens_per_s"] > 0 and b["decode_tokens_per_s"] > 0
    assert result["peak_memory_bytes"] >= result["weights_memory_bytes"] > 0
    assert model.training  # left as it was found


def test_normalize_answer():
    assert normalize_answer("  42 \n") == "42"
    assert normalize_answer("a\t b\n\nc") == "a b c"


class _Echo(torch.nn.Module):
    """Generates a fixed continuation, to test the comparison without a trained model."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation

    def generate(self, input_ids, **kwargs):
        assert kwargs["generation_config"].do_sample is False
        return torch.cat([input_ids, torch.tensor([self.continuation])], dim=1)


def test_exact_match_compares_normalized_text(tokenizer):
    answer_ids = tokenizer("  hello   world\n", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "say", "answer": "hello world"}, {"prompt": "say", "answer": "goodbye"}]
    result = exact_match(_Echo(answer_ids + [tokenizer.eos_token_id]), tokenizer, rows, max_length=64)
    assert result["exact_match"] == 0.5
    assert [s["match"] for s in result["generation_samples"]] == [True, False]


def test_user_mistakes_are_one_line_errors(tmp_path, teacher_dir, student_dir, eval_file):
    quiet = dict(speed=False, show_progress=False, log=lambda *_: None)
    with pytest.raises(DistillError, match="does not exist"):
        evaluate_models(str(teacher_dir), {"student": str(tmp_path / "nope")}, str(eval_file), None, **quiet)
    with pytest.raises(DistillError, match="not allowed"):
        evaluate_models(str(teacher_dir), {"teacher": str(student_dir)}, str(eval_file), None, **quiet)
    with pytest.raises(DistillError, match="does not exist"):
        evaluate_models(str(teacher_dir), {"student": str(student_dir)}, str(tmp_path / "x.jsonl"), None, **quiet)
    with pytest.raises(DistillError, match="device"):
        evaluate_models(str(teacher_dir), {"student": str(student_dir)}, str(eval_file), None, device="gpu0", **quiet)
    bad_generation = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "a"}])
    with pytest.raises(DistillError, match="answer"):
        evaluate_models(
            str(teacher_dir),
            {"student": str(student_dir)},
            str(eval_file),
            None,
            generation=str(bad_generation),
            **quiet,
        )


def test_different_tokenizer_is_refused(tmp_path, teacher_dir, eval_file):
    from conftest import qwen2_config, save_model

    other = train_tokenizer(vocab_size=300)
    folder = save_model(qwen2_config(len(other)), other, tmp_path / "other")
    with pytest.raises(DistillError, match="tokenizers differ"):
        evaluate_models(
            str(teacher_dir), {"other": str(folder)}, str(eval_file), None, speed=False, show_progress=False, log=print
        )


def test_collate_alignment_used_by_evaluation(tokenizer):
    # The evaluation relies on labels[:, i] being the target of output i, i.e. input token i+1.
    e = Example([5, 6, 7, 8], [False, False, True, True])
    batch = collate([e], pad_id=0)
    assert batch["labels"].tolist() == [[-100, 7, 8]]
    assert F.pad(batch["labels"], (1, 0), value=-100).shape == batch["input_ids"].shape


def test_parse_model_arguments(tmp_path):
    models = parse_model_arguments(["./s", "small=./s2"], ["./b"])
    assert models == {"student": "./s", "small": "./s2", "baseline": "./b"}
    assert list(models) == ["student", "small", "baseline"]
    odd = tmp_path / "run=3"  # an existing folder whose name holds "=" is a path, not NAME=DIR
    odd.mkdir()
    assert parse_model_arguments([str(odd)]) == {"student": str(odd)}
    with pytest.raises(DistillError, match="twice"):
        parse_model_arguments(["./a", "./b"])
    with pytest.raises(DistillError, match="at least one"):
        parse_model_arguments([], [])
