"""`distill demo`: the stdlib corpus, the shipped teacher, and a few-step demo end to end."""

from __future__ import annotations

import json

import pytest

from conftest import REPORT_MODEL_KEYS
from distill.demo import corpus
from distill.demo.run import TEACHER_DIR, run_demo

CONTRACT_KEYS = REPORT_MODEL_KEYS


def test_corpus_is_deterministic_and_held_out_modules_are_never_trained_on():
    train, held_out = corpus.list_files()
    assert (train, held_out) == corpus.list_files()
    assert train == sorted(train) and held_out == sorted(held_out)
    assert not set(train) & set(held_out)
    for entry in corpus.HELD_OUT:  # every held-out module exists in Python 3.10 to 3.13
        assert any(f.startswith(entry) for f in held_out) if entry.endswith("/") else entry in held_out, entry
    assert not any("/test/" in f"/{f}" or "/tests/" in f"/{f}" for f in train)
    assert len(train) > 300


def test_completion_rows_predict_a_held_out_line_from_the_lines_before_it():
    _, held_out = corpus.list_files()
    rows = corpus.completion_rows(held_out[:3])
    assert rows and rows == corpus.completion_rows(held_out[:3])
    sources = [corpus.read_source(f) for f in held_out[:3]]
    for row in rows:
        # The prompt stops where the previous line ends: the newline and indentation are the model's to predict.
        source = next(s for s in sources if row["prompt"] + "\n" in s)
        following = source.split(row["prompt"] + "\n", 1)[1]
        assert following.splitlines()[0].strip() == row["answer"] and len(row["answer"]) >= 8


def test_shipped_teacher_loads_offline_with_its_own_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR)
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.model_type == "llama"
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 10e6
    weights = sum(f.stat().st_size for f in TEACHER_DIR.glob("*.safetensors"))
    assert weights <= 25e6
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo for the tests below: (result, its folder)."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    return run_demo(out, quick=True, log=lambda _: None, show_table=False), out


@pytest.mark.slow
def test_quick_demo_writes_the_report_and_the_student_moves_toward_the_teacher(quick_demo):
    result, out = quick_demo

    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert json.loads((out / "demo.json").read_text()) == json.loads(json.dumps(result))
    models = report["models"]
    for name in ("teacher", "student", "baseline", "pruned"):
        assert set(models[name]) >= CONTRACT_KEYS, name
        assert 0 <= models[name]["exact_match"] <= 1
    for name in ("student", "baseline"):
        assert {"top1_accuracy", "cross_entropy", "agreement"} <= set(report["retention"][name])
        assert {"decode", "params"} <= set(report["speedup"][name])
    assert report["speedup"]["student"]["params"] >= 4
    assert set(result["targets"]) == {
        "params_ratio",
        "decode_speedup",
        "top1_accuracy_retention",
        "cross_entropy_vs_baseline",
        "agreement_vs_baseline",
    }

    # A few steps of distillation already move the pruned student toward the teacher, and the baseline learns too.
    pruned, student, baseline = models["pruned"], models["student"], models["baseline"]
    assert student["kl_to_teacher"] < pruned["kl_to_teacher"]
    assert student["cross_entropy"] < pruned["cross_entropy"]
    assert baseline["cross_entropy"] < pruned["cross_entropy"]
    assert (out / "student-init" / "pruning.json").exists()
    assert (out / "distilled" / "student" / "config.json").exists()


@pytest.mark.slow
def test_quick_demo_shows_the_completions_that_its_exact_match_counted(quick_demo, capsys):
    from distill.demo.summary import EXAMPLE_COUNT, print_table
    from distill.report.generation import normalize_answer

    result, out = quick_demo
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "data" / "completion.jsonl").read_text().splitlines()]
    shown = result["completion_examples"]
    assert shown == report["completion_examples"] and shown["rows"] == len(rows)
    assert "teacher completes exactly" in shown["rule"]
    examples = shown["examples"]
    assert len(examples) == min(EXAMPLE_COUNT, len(rows))

    models = report["models"]
    for name, model in models.items():
        outputs = model["completions"]
        assert len(outputs) == len(rows)
        assert sum(c["match"] for c in outputs) == shown["exact"][name]
        assert sum(c["match"] for c in outputs) / len(rows) == pytest.approx(model["exact_match"])
        for row, c in zip(rows, outputs, strict=True):
            assert c["match"] == (normalize_answer(c["output"]) == normalize_answer(row["answer"]))
    # The rule: rows the teacher got right come first, each group in file order.
    teacher = models["teacher"]["completions"]
    expected = sorted(range(len(rows)), key=lambda i: (not teacher[i]["match"], i))[: len(examples)]
    assert [e["row"] for e in examples] == expected
    for e in examples:
        row = rows[e["row"]]
        assert e["answer"] == row["answer"] and row["prompt"].endswith(e["context_last_line"])
        assert set(e["completions"]) == set(models)
        assert all(e["completions"][n] == models[n]["completions"][e["row"]] for n in models)

    print_table(result)
    printed = capsys.readouterr().out
    marks = sum(c["match"] for e in examples for c in e["completions"].values())
    assert printed.count("✓") == marks + 1  # + the legend "✓ = exact match"
    assert all(e["answer"][:40] in printed for e in examples)
    markdown = (out / "report.md").read_text()
    assert "Line completions side by side" in markdown and examples[0]["answer"][:40] in markdown


@pytest.mark.slow
def test_quick_demo_names_the_features_of_the_recipes_it_ran(quick_demo):
    result, out = quick_demo
    features = result["features"]
    pruning = json.loads((out / "student-init" / "pruning.json").read_text())
    assert features["student"]["kept_layers"] == pruning["kept_layers"]
    assert features["student"]["shape"] == pruning["config_diff"]
    assert features["training"]["steps"] == result["steps"] == 4
    assert features["objective"]["divergence"] == "forward_kl" and features["objective"]["fused_loss"] is True
    assert features["baseline_differs_in"] == {"objective.ce_weight": 1.0, "objective.kd_weight": 0.0}


def test_demo_refuses_a_folder_that_is_not_a_previous_demo(tmp_path):
    from distill.errors import DistillError

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DistillError, match="not empty"):
        run_demo(tmp_path, quick=True, log=lambda _: None, show_table=False)
    assert (tmp_path / "mine.txt").exists()
