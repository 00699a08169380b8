"""The demo's summary: which completions it shows, and the features it names, come from what ran."""

from __future__ import annotations

from pathlib import Path

from distill.config import recipe_from_dict
from distill.demo.run import demo_recipe
from distill.demo.summary import completion_examples, completion_lines, feature_lines, used_features

PRUNED = {
    "kept_layers": [0, 1, 5],
    "config_diff": {"num_hidden_layers": [6, 3], "hidden_size": [256, 128]},
    "layer_search": {"method": "exhaustive", "forward_passes": 20},
}


def _rows(count: int) -> list[dict]:
    return [{"prompt": f"x = {i}\n    y = f(x)", "answer": f"z = g({i})"} for i in range(count)]


def _outputs(rows: list[dict], right: set[int]) -> list[dict]:
    return [{"output": r["answer"] if i in right else "pass", "match": i in right} for i, r in enumerate(rows)]


def test_examples_put_the_teachers_exact_rows_first_whatever_the_student_got_right():
    rows = _rows(6)
    teacher, student, baseline = _outputs(rows, {2, 4}), _outputs(rows, {0, 1}), _outputs(rows, set())
    completions = {"teacher": teacher, "student": student, "baseline": baseline}
    shown = completion_examples(rows, completions, count=4)
    assert [e["row"] for e in shown["examples"]] == [2, 4, 0, 1]
    assert shown["exact"] == {"teacher": 2, "student": 2, "baseline": 0} and shown["rows"] == 6
    first = shown["examples"][0]
    assert first["context_last_line"] == "    y = f(x)" and first["answer"] == "z = g(2)"
    assert first["completions"]["teacher"] == {"output": "z = g(2)", "match": True}

    lines = completion_lines(shown)
    assert sum(line.count("✓") for line in lines) == 1 + 2 + 2  # legend + teacher on rows 2, 4 + student on 0, 1
    assert lines[-1] == "  exact on all rows: teacher 2/6, distilled 2/6, hard labels 0/6"


def test_features_follow_the_recipe_that_ran(tmp_path: Path):
    data = {"train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl"}
    kd = demo_recipe(tmp_path / "teacher", tmp_path / "init", data, tmp_path / "kd", 80, kd=True)
    hard = demo_recipe(tmp_path / "teacher", tmp_path / "init", data, tmp_path / "hard", 80, kd=False)
    kd["objective"].update(temperature=2.0, divergence="reverse_kl")
    features = used_features(PRUNED, recipe_from_dict(kd), recipe_from_dict(hard))

    assert features["objective"]["temperature"] == 2.0 and features["objective"]["divergence"] == "reverse_kl"
    # The baseline's differences are measured, the output folders aside.
    assert features["baseline_differs_in"] == {
        "objective.ce_weight": 1.0,
        "objective.divergence": "forward_kl",
        "objective.kd_weight": 0.0,
        "objective.temperature": 1.0,
    }
    text = "\n".join(feature_lines(features))
    assert "reverse_kl at temperature 2" in text and "fused chunked loss" in text
    assert "layers [0, 1, 5] kept by KL to the teacher (exhaustive search, 20 teacher passes)" in text
    assert "80 steps x 8 x 128 tokens packed" in text

    uniform = used_features({**PRUNED, "layer_search": None}, recipe_from_dict(kd), recipe_from_dict(hard))
    assert "spread evenly" in uniform["student"]["layer_choice"]
