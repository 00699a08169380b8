"""Failure modes: repetition and loops on hand-made token lists, ECE by hand, and the report's failure_modes rows."""

from __future__ import annotations

import pytest
import torch

from conftest import write_jsonl
from distill.data import Example
from distill.losses.token_metrics import chunk_metrics
from distill.report.evaluate import evaluate_models
from distill.report.failures import (
    FailureSettings,
    expected_calibration_error,
    generated_tokens,
    generation_failures,
    loops,
    repeated_ngrams,
)
from distill.report.generation import eval_prompts

QUIET = {"show_progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a machine shared with other work it made these
    generation-heavy tests many times slower (measured: a 0.3 s forward loop took 9 s with two threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_repeated_ngrams_by_hand():
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4], 4) == (1, 5)  # 1234 2341 3412 4123 1234: the last one again
    assert repeated_ngrams([7, 7, 7, 7, 7, 7], 2) == (4, 5)
    assert repeated_ngrams([1, 2, 3, 4, 5], 4) == (0, 2)
    assert repeated_ngrams([1, 2, 3], 4) == (0, 0)  # shorter than n: no n-grams at all


def test_loops_by_hand():
    a, b, c = 11, 12, 13
    assert loops([5, 6, a, b, c, a, b, c, a, b], ended=False, n=4, max_period=16)  # period 3 over the last 8
    assert loops([9] * 8, ended=False, n=4, max_period=16)  # one token over and over
    assert not loops([9] * 8, ended=True, n=4, max_period=16)  # an EOS ended it: not stuck
    assert not loops([9] * 7, ended=False, n=4, max_period=16)  # 2n = 8 tokens needed
    assert not loops([1, 2, 3, 4, 5, 1, 2, 3, 4], ended=False, n=4, max_period=16)  # one repeated 4-gram only
    block = list(range(10))
    assert loops(block + block, ended=False, n=4, max_period=16)  # a 10-token line twice
    assert not loops(block + block, ended=False, n=4, max_period=9)  # ... longer than the periods looked for


def test_generated_tokens_stop_at_eos():
    rows = generated_tokens(torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]), [2])
    assert rows == [([5, 6], True), ([5, 6, 7, 8, 9], False), ([], True)]


def test_generation_failures_aggregate_over_generations():
    settings = FailureSettings(ngram=2, max_period=4, new_tokens=6)
    rows = [([1, 1, 1, 1, 1, 1], False), ([1, 2, 3], True), ([4, 5, 4, 5], False)]
    got = generation_failures(rows, settings)
    # 2-grams: 5 (4 repeated) + 2 (0) + 3 (1: 45 again) -> 5 / 10
    assert got["repeated_ngram_share"] == pytest.approx(5 / 10)
    assert got["looping_share"] == pytest.approx(2 / 3)  # 1 1 1 1 (p=1) and 4 5 4 5 (p=2); the EOS row is not
    assert got["ended_share"] == pytest.approx(1 / 3)
    assert got["mean_generated_tokens"] == pytest.approx(13 / 3)
    assert got["generations"] == 3 and got["ngram"] == 2
    none = generation_failures([], settings)  # no prompts: nothing measured, not a perfect 0%
    assert none["generations"] == 0 and none["looping_share"] is None and none["repeated_ngram_share"] is None


def test_expected_calibration_error_by_hand():
    confidence = torch.tensor([0.95, 0.95, 0.55, 0.15])
    correct = torch.tensor([True, False, True, False])
    # 15 bins of width 1/15: 0.95 -> bin 15, 0.55 -> bin 9, 0.15 -> bin 3.
    # |0.5 - 0.95| * 2/4 + |1 - 0.55| * 1/4 + |0 - 0.15| * 1/4 = 0.225 + 0.1125 + 0.0375
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.375)
    # Within one bin over- and under-confidence cancel (it is a per-bin gap, not a per-token one).
    assert expected_calibration_error(torch.tensor([0.5, 0.52]), torch.tensor([True, False])) == pytest.approx(0.01)
    assert expected_calibration_error(torch.tensor([1.0]), torch.tensor([True])) == 0.0  # 1.0 is in the last bin
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) is None


def test_confidence_is_the_top1_probability():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = chunk_metrics(logits, torch.tensor([0, 1]))
    z = 2.0 + torch.e**2
    assert m["confidence"].tolist() == pytest.approx([torch.e**2 / z, 1 / 3])


def test_eval_prompts_take_the_prompt_or_the_start_of_the_text():
    prompt_row = Example([1, 5, 6, 7, 8, 9], [False, False, False, True, True, True])
    text_row = Example(list(range(1, 21)), [True] * 20)
    assert eval_prompts([prompt_row, text_row], 2, 32) == [[1, 5, 6], list(range(1, 11))]
    assert eval_prompts([prompt_row, text_row], 2, 2) == [[5, 6], [1, 2]]
    assert eval_prompts([prompt_row, text_row], 1, 8) == [[1, 5, 6]]
    assert eval_prompts([], 4, 8) == [] and eval_prompts([text_row], 0, 8) == []


def test_report_has_failure_modes_for_every_model(teacher_dir, student_dir, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"text": "hello world, the lazy fox jumps"}, {"text": "for i in"}] * 3)
    settings = FailureSettings(prompts=3, new_tokens=12)
    out = tmp_path / "out"
    report = evaluate_models(
        str(teacher_dir),
        {"student": str(student_dir)},
        str(data),
        str(out),
        speed=False,
        draft=False,
        failure_settings=settings,
        **QUIET,
    )
    for name in ("teacher", "student"):
        f = report["models"][name]["failure_modes"]
        assert f["generations"] == 3 and f["max_new_tokens"] == 12 and f["ngram"] == 4
        assert 0.0 <= f["repeated_ngram_share"] <= 1.0 and 0.0 <= f["looping_share"] <= 1.0
        assert 0.0 < f["mean_generated_tokens"] <= 12
        assert 0.0 <= f["expected_calibration_error"] <= 1.0
    assert report["models"]["teacher"]["failure_modes"]["length_ratio_to_teacher"] == 1.0
    student = report["models"]["student"]["failure_modes"]
    teacher = report["models"]["teacher"]["failure_modes"]
    assert student["length_ratio_to_teacher"] == pytest.approx(
        student["mean_generated_tokens"] / teacher["mean_generated_tokens"]
    )
    assert "expected_calibration_error" not in report["models"]["student"]  # one place: failure_modes
    assert "Failure modes (3 greedy generations of up to 12 tokens)" in (out / "report.md").read_text()
