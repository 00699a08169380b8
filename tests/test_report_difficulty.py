"""Retention by difficulty: buckets of the eval tokens by the teacher's entropy, against a dense reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import llama_config, save_model, write_jsonl
from distill.data import build_examples
from distill.losses.token_metrics import chunk_metrics
from distill.models import load_model, load_tokenizer
from distill.report.difficulty import bucket_index, bucket_metrics, difficulty_edges
from distill.report.evaluate import evaluate_models
from distill.report.failures import FailureSettings, expected_calibration_error

QUIET = {"show_progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a machine shared with other work it made these
    generation-heavy tests many times slower (measured: a 0.3 s forward loop took 9 s with two threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory, tokenizer):
    """A tiny teacher with large weights: its next-token entropies spread from near 0 to near log V, so the
    difficulty buckets differ (a default random model is near-uniform everywhere, all entropies within 1e-3)."""
    folder = tmp_path_factory.mktemp("sharp_teacher")
    return save_model(llama_config(len(tokenizer) + 16, hidden=64, initializer_range=0.3), tokenizer, folder, seed=3)


@pytest.fixture(scope="module")
def judged(tmp_path_factory, sharp_teacher_dir, student_dir):
    folder = tmp_path_factory.mktemp("difficulty")
    rows = [
        {"prompt": "def add(a, b):", "completion": "\n    return a + b\n"},
        {"text": "hello world, the lazy fox jumps over the quick brown dog"},
        {"text": "for i in range(10):\n    print(i * i)\n"},
    ] * 2
    data = write_jsonl(folder / "eval.jsonl", rows)
    out = folder / "out"
    report = evaluate_models(
        str(sharp_teacher_dir),
        {"student": str(student_dir)},
        str(data),
        str(out),
        batch_size=4,  # padded batches with prompt rows
        speed=False,
        draft=False,
        memory_budget_bytes=1,  # one token's logits at a time: the chunked path at its smallest
        failure_settings=FailureSettings(prompts=2, new_tokens=4),
        **QUIET,
    )
    return report, out, data


def _dense_reference(teacher_dir, student_dir, data) -> dict[str, torch.Tensor]:
    """Per counted token, one example at a time from full logits: teacher entropy, and both models' metrics."""
    tokenizer = load_tokenizer(str(teacher_dir), "teacher")
    vocab = len(tokenizer)
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    student = load_model(str(student_dir), "student", torch.float32).eval()
    examples, _ = build_examples(str(data), tokenizer, 256)
    values: dict[str, list] = {k: [] for k in ("entropy", "t_correct", "s_correct", "agree", "kl", "ce", "t_ce")}
    values["t_conf"], values["s_conf"] = [], []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            t_lp = torch.log_softmax(teacher(input_ids=ids).logits[0, :, :vocab].double(), -1)  # (T, V)
            s_lp = torch.log_softmax(student(input_ids=ids).logits[0, :, :vocab].double(), -1)  # (T, V)
            for i in range(1, len(e.input_ids)):
                if not e.loss_mask[i]:
                    continue
                t, s, target = t_lp[i - 1], s_lp[i - 1], e.input_ids[i]
                values["entropy"].append(float(-(t.exp() * t).sum()))
                values["t_correct"].append(int(t.argmax()) == target)
                values["s_correct"].append(int(s.argmax()) == target)
                values["agree"].append(int(s.argmax()) == int(t.argmax()))
                values["kl"].append(float((t.exp() * (t - s)).sum()))
                values["ce"].append(float(-s[target]))
                values["t_ce"].append(float(-t[target]))
                values["t_conf"].append(float(t.max().exp()))
                values["s_conf"].append(float(s.max().exp()))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def test_bucket_token_counts_sum_to_the_counted_tokens(judged):
    report, out, _ = judged
    counted = report["data"]["counted_tokens"]
    assert set(report["by_difficulty"]) == {"teacher", "student"}
    for name, buckets in report["by_difficulty"].items():
        assert [b["bucket"] for b in buckets] == [1, 2, 3, 4]
        assert sum(b["tokens"] for b in buckets) == counted == report["models"][name]["tokens"]
        edges = [buckets[0]["teacher_entropy_low"]] + [b["teacher_entropy_high"] for b in buckets]
        assert edges == sorted(edges)
    for b in report["by_difficulty"]["teacher"]:
        assert b["agreement"] == 1.0 and b["kl_to_teacher"] == 0.0 and "retention" not in b
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["by_difficulty"] == pytest.approx(report["by_difficulty"])
    assert (out / "by_difficulty.png").read_bytes().startswith(b"\x89PNG")
    assert "Retention by difficulty" in (out / "report.md").read_text()


def test_buckets_equal_a_dense_reference(judged, sharp_teacher_dir, student_dir):
    report, _, data = judged
    ref = _dense_reference(sharp_teacher_dir, student_dir, data)
    edges = np.quantile(ref["entropy"].numpy(), [0.0, 0.25, 0.5, 0.75, 1.0])
    student = report["by_difficulty"]["student"]
    got_edges = [student[0]["teacher_entropy_low"]] + [b["teacher_entropy_high"] for b in student]
    assert got_edges == pytest.approx(edges.tolist(), abs=1e-5)
    # Bucket b: edges[b] < H <= edges[b + 1] (the first from the minimum). A float32 entropy within rounding of an
    # edge could fall on the other side than its float64 one; no token of the test data is that close to an edge
    # it does not itself define (an edge at an order statistic is that token's own entropy in both).
    bucket = torch.bucketize(ref["entropy"], torch.tensor(edges[1:-1]), right=False)
    gaps = (ref["entropy"][:, None] - torch.tensor(edges[1:-1])[None, :]).abs()
    assert ((gaps < 1e-12) | (gaps > 1e-5)).all()
    for b in range(4):
        inside = bucket == b
        n = int(inside.sum())
        row = student[b]
        assert row["tokens"] == n > 0
        assert row["top1_accuracy"] == pytest.approx(float(ref["s_correct"][inside].mean()), abs=1e-9)
        assert row["agreement"] == pytest.approx(float(ref["agree"][inside].mean()), abs=1e-9)
        assert row["kl_to_teacher"] == pytest.approx(float(ref["kl"][inside].mean()), rel=1e-4, abs=1e-6)
        assert row["cross_entropy"] == pytest.approx(float(ref["ce"][inside].mean()), rel=1e-5)
        assert row["mean_teacher_entropy"] == pytest.approx(float(ref["entropy"][inside].mean()), rel=1e-5)
        teacher_row = report["by_difficulty"]["teacher"][b]
        assert teacher_row["top1_accuracy"] == pytest.approx(float(ref["t_correct"][inside].mean()), abs=1e-9)
        assert row["retention"]["cross_entropy"] == pytest.approx(
            float(ref["t_ce"][inside].mean() / ref["ce"][inside].mean()), rel=1e-5
        )
    # Calibration comes from the same chunked pass.
    for name, conf, correct in (("student", "s_conf", "s_correct"), ("teacher", "t_conf", "t_correct")):
        expected = expected_calibration_error(ref[conf], ref[correct].bool())
        got = report["models"][name]["failure_modes"]["expected_calibration_error"]
        assert got == pytest.approx(expected, abs=1e-5), name


def test_teacher_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = chunk_metrics(logits, torch.tensor([1, 0]), teacher)
    assert m["teacher_entropy"].tolist() == pytest.approx([np.log(3.0)] * 2)
    assert m["teacher_confidence"].tolist() == pytest.approx([1 / 3, 1 / 3])
    z = 2.0 + np.e**2
    p = np.array([np.e**2, 1.0, 1.0]) / z
    alone = chunk_metrics(logits, torch.tensor([1, 0]))  # no teacher: the model's own entropy
    assert alone["entropy"][0] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-6)


def test_buckets_by_hand():
    entropy = torch.tensor([0.1, 0.2, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4])
    edges = difficulty_edges(entropy)
    assert edges == pytest.approx(np.quantile(entropy.double().numpy(), [0, 0.25, 0.5, 0.75, 1]).tolist())
    index = bucket_index(entropy, edges)
    # q1 = 0.2: both 0.2 go to the first bucket (ties to the lower bucket); q2 = 0.6, q3 = 2.0.
    assert index.tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    tensors = {
        "correct": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool),
        "agreement": torch.ones(8, dtype=torch.bool),
        "kl_to_teacher": torch.arange(8.0),
        "cross_entropy": torch.ones(8),
        "teacher_entropy": entropy,
    }
    rows = bucket_metrics(tensors, index)
    assert [r["tokens"] for r in rows] == [3, 1, 2, 2]
    assert rows[0]["top1_accuracy"] == pytest.approx(2 / 3) and rows[3]["top1_accuracy"] == pytest.approx(0.5)
    assert rows[1]["kl_to_teacher"] == pytest.approx(3.0) and rows[2]["mean_teacher_entropy"] == pytest.approx(1.2)
