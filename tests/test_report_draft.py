"""Each model as the teacher's speculative-decoding draft: acceptance counted exactly, the teacher's own greedy output.

The counts read from transformers' candidate generator are checked against an independent greedy speculative loop
written out here (full forwards, no cache), and the teacher as its own draft must have every proposal accepted."""

from __future__ import annotations

import pytest
import torch

from conftest import llama_config, save_model, write_jsonl
from distill.config import ReportConfig
from distill.models import load_model
from distill.report.draft import DraftSettings, measure_draft
from distill.report.evaluate import evaluate_models
from distill.report.failures import FailureSettings
from distill.report.speed import SpeedSettings
from distill.sampling import decode, eos_ids

QUIET = {"show_progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a machine shared with other work it made these
    generation-heavy tests many times slower (measured: a 0.3 s forward loop took 9 s with two threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["def add(a, b):", "the quick brown", "for i in range(10):", "hello world"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def models(teacher_dir, tmp_path_factory, tokenizer):
    """The tiny teacher and a different draft with the same vocabulary (a second random Llama, padded alike)."""
    draft_dir = save_model(
        llama_config(len(tokenizer) + 16, hidden=32), tokenizer, tmp_path_factory.mktemp("draft"), seed=5
    )
    return load_model(str(teacher_dir), "teacher", torch.float32).eval(), load_model(
        str(draft_dir), "draft", torch.float32
    ).eval()


def _reference(teacher, draft, prompt, new_tokens: int, gamma: int, eos: set[int], vocab: int):
    """Greedy speculative decoding written out: (tokens, proposed, accepted, rounds).

    Each round the draft proposes min(γ, tokens left − 1) greedy tokens (ending early at EOS), the teacher scores
    prompt + proposal in one forward and keeps the proposal up to its first disagreement plus its own next token,
    exactly the rule of transformers' assisted generation. Ids past the tokenizer are never chosen."""

    def argmax(model, ids):
        return model(input_ids=torch.tensor([ids])).logits[0, :, :vocab].argmax(-1).tolist()  # (T,)

    out, proposed, accepted, rounds = [], 0, 0, 0
    while len(out) < new_tokens and not (out and out[-1] in eos):
        proposal = []
        for _ in range(min(gamma, new_tokens - len(out) - 1)):
            proposal.append(argmax(draft, prompt + out + proposal)[-1])
            if proposal[-1] in eos:
                break
        choices = argmax(teacher, prompt + out + proposal)[len(prompt) + len(out) - 1 :]  # (len(proposal) + 1,)
        n = 0
        while n < len(proposal) and proposal[n] == choices[n]:
            n += 1
        kept = proposal[:n] + [choices[n]]
        if any(t in eos for t in kept):
            kept = kept[: next(i for i, t in enumerate(kept) if t in eos) + 1]
        out += kept
        proposed, accepted, rounds = proposed + len(proposal), accepted + len(kept) - 1, rounds + 1
    return out, proposed, accepted, rounds


@torch.no_grad()
def test_teacher_as_its_own_draft_accepts_everything(models, tokenizer):
    teacher, _ = models
    eos = eos_ids(teacher, tokenizer)
    settings = DraftSettings(new_tokens=12, draft_tokens=4)
    result = measure_draft(teacher, teacher, _prompts(tokenizer), eos, 0, len(tokenizer), settings)
    assert result["draft_acceptance_rate"] == 1.0
    d = result["draft"]
    assert d["outputs_equal_teacher"] and d["prompts_equal_teacher"] == 4
    assert d["accepted_tokens"] == d["proposed_tokens"] > 0
    assert result["speculative_decode_speedup"] > 0


@torch.no_grad()
def test_counts_equal_an_independent_speculative_loop(models, tokenizer):
    teacher, draft = models
    eos = eos_ids(teacher, tokenizer)
    prompts, gamma, new_tokens = _prompts(tokenizer), 3, 10
    result = measure_draft(
        teacher, draft, prompts, eos, 0, len(tokenizer), DraftSettings(new_tokens=new_tokens, draft_tokens=gamma)
    )
    proposed = accepted = rounds = 0
    for prompt in prompts:
        tokens, p, a, r = _reference(teacher, draft, prompt, new_tokens, gamma, set(eos), len(tokenizer))
        greedy = decode(teacher, [prompt], max_new_tokens=new_tokens, eos_ids=eos, pad_id=0, vocab_size=len(tokenizer))
        assert tokens == greedy.new_ids[0].tolist()  # the written-out loop is the teacher's greedy output too
        proposed, accepted, rounds = proposed + p, accepted + a, rounds + r
    d = result["draft"]
    assert (d["proposed_tokens"], d["accepted_tokens"], d["teacher_forwards"]) == (proposed, accepted, rounds)
    assert result["draft_acceptance_rate"] == accepted / proposed
    assert 0.0 <= result["draft_acceptance_rate"] < 1.0  # a different random model: some proposals are rejected
    assert d["outputs_equal_teacher"]


@torch.no_grad()
def test_decode_with_a_draft_restores_both_generation_configs(models, tokenizer):
    teacher, draft = models
    before = (teacher.generation_config, draft.generation_config)
    draft.generation_config.num_assistant_tokens = 17  # a checkpoint's own setting: not used, and kept
    common = dict(max_new_tokens=6, eos_ids=[], pad_id=0, vocab_size=len(tokenizer))
    plain = decode(teacher, [_prompts(tokenizer)[0]], **common)
    helped = decode(teacher, [_prompts(tokenizer)[0]], **common, assistant=draft)
    assert torch.equal(plain.new_ids, helped.new_ids)
    assert teacher.generation_config is before[0] and draft.generation_config is before[1]
    assert draft.generation_config.num_assistant_tokens == 17


@pytest.fixture(scope="module")
def drafted(tmp_path_factory, teacher_dir, student_dir):
    """The report with the teacher itself as a model (its own draft) and the tiny student (another vocab size)."""
    folder = tmp_path_factory.mktemp("drafted")
    data = write_jsonl(folder / "eval.jsonl", [{"prompt": "def add(a, b):", "completion": " return a + b"}] * 3)
    models = {"itself": str(teacher_dir), "student": str(student_dir)}
    settings = DraftSettings(prompts=2, new_tokens=8, draft_tokens=3)
    failures = FailureSettings(prompts=1, new_tokens=4)
    report = evaluate_models(
        str(teacher_dir),
        models,
        str(data),
        str(folder / "out"),
        speed_settings=SpeedSettings(runs=1, warmup=0, prompt_tokens=4, new_tokens=2, batch_size=1),
        draft_settings=settings,
        failure_settings=failures,
        **QUIET,
    )
    return report, folder / "out"


def test_report_gives_every_model_a_draft_entry(drafted):
    report, out = drafted
    itself, student = report["models"]["itself"], report["models"]["student"]
    assert itself["draft_acceptance_rate"] == 1.0 and itself["draft"]["outputs_equal_teacher"]
    assert 0.0 <= student["draft_acceptance_rate"] <= 1.0 and student["draft"]["outputs_equal_teacher"]
    assert student["speculative_decode_speedup"] > 0 and student["draft"]["prompts"] == 2
    assert "draft_acceptance_rate" not in report["models"]["teacher"]
    assert "As the teacher's draft" in (out / "report.md").read_text()
    assert "As the teacher&#x27;s draft" in (out / "report.html").read_text()


def test_draft_off_leaves_null_keys_and_a_note(teacher_dir, student_dir, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"text": "hello world, the lazy fox"}] * 2)
    none = FailureSettings(prompts=0)
    report = evaluate_models(
        str(teacher_dir),
        {"student": str(student_dir)},
        str(data),
        None,
        speed=False,
        draft=False,
        failure_settings=none,
        **QUIET,
    )
    student = report["models"]["student"]
    assert student["draft_acceptance_rate"] is None and student["speculative_decode_speedup"] is None
    assert "report.draft is off" in student["draft_note"]
    assert ReportConfig().draft is True
    untimed = evaluate_models(
        str(teacher_dir), {"student": str(student_dir)}, str(data), None, speed=False, failure_settings=none, **QUIET
    )
    assert "timing is off" in untimed["models"]["student"]["draft_note"]  # the check times the teacher
