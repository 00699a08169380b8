"""Depth chosen by measurement (distill.student.depth): KL search, the layer-subset forward, and the switches.

The exact checks: running the teacher with a subset of its layers must give the logits of the student that keeps
those layers; a layer made an identity (o_proj and down_proj zeroed) costs exactly nothing to drop, so the KL search
must drop it; exhaustive and greedy search must agree where greedy cannot go wrong.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CORPUS, llama_config, write_jsonl
from distill.cli import main
from distill.config import recipe_from_dict
from distill.errors import DistillError
from distill.losses.dense import log_probs
from distill.student.build import build_student
from distill.student.depth import (
    CalibrationKL,
    exhaustive_cost,
    greedy_cost,
    layer_subset,
    search_layers,
)


def _quiet(*_):
    pass


def _model(config, seed=0, identity=()):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for i in identity:
            # Nothing reaches the residual stream: the layer's output is its input, bit for bit.
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _examples(tokenizer):
    return [tokenizer(line)["input_ids"] for line in CORPUS]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    rows = [{"text": f"{line} {i}"} for i, line in enumerate(CORPUS * 2)]
    return write_jsonl(tmp_path_factory.mktemp("calibration") / "calibration.jsonl", rows)


# ---------------------------------------------------------------- the subset forward


def _gemma2(vocab_size):
    from transformers import Gemma2Config

    # Sliding and full attention alternate: the subset forward must look up each kept layer's own type.
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=3,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@pytest.mark.parametrize("make_config", [lambda v: llama_config(v, hidden=32, layers=5), _gemma2])
def test_layer_subset_runs_the_student_that_keeps_those_layers(make_config, tokenizer, tmp_path, calibration):
    teacher = _model(make_config(len(tokenizer)))
    teacher_dir = _save(teacher, tokenizer, tmp_path / "teacher")
    summary = build_student(teacher_dir, tmp_path / "s", layers=3, calibration=calibration, log=_quiet)
    kept = summary["kept_layers"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    ids = torch.tensor([tokenizer("for i in range(10): the quick brown fox")["input_ids"]])  # (1, T)
    with torch.no_grad():
        full = teacher(input_ids=ids, use_cache=False).logits  # (1, T, V)
        with layer_subset(teacher, kept):
            assert len(teacher.model.layers) == 3
            subset = teacher(input_ids=ids, use_cache=False).logits
        after = teacher(input_ids=ids, use_cache=False).logits
        expected = student(input_ids=ids, use_cache=False).logits
    assert subset.shape == expected.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(subset, expected, rtol=1e-5, atol=1e-5)
    # Everything is put back: all layers, the config, the same outputs.
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == 5
    assert torch.equal(after, full)

    # The scorer's number is the mean forward KL over tokens, from a dense reference written out here.
    score = CalibrationKL(teacher, [ids[0].tolist()], max_tokens=10_000)
    lt, ls = log_probs(full[0]), log_probs(expected[0])  # (T, V)
    reference = (lt.exp() * (lt - ls)).sum(-1).mean()
    assert score(kept) == pytest.approx(float(reference), rel=1e-4, abs=1e-7)
    assert score(list(range(5))) == pytest.approx(0.0, abs=1e-6)


def test_calibration_is_cut_to_max_tokens_and_batched_without_padding(tokenizer):
    model = _model(llama_config(len(tokenizer), hidden=32, layers=2))
    examples = [list(range(3, 13))] * 5 + [list(range(3, 8))]  # 5 x 10 tokens, then 5
    score = CalibrationKL(model, examples, max_tokens=47, batch_tokens=20)
    assert score.tokens == 47
    assert [tuple(b.shape) for b in score.batches] == [(2, 10), (2, 10), (1, 7)]
    assert all(t.shape == (*b.shape, len(tokenizer)) for b, t in zip(score.batches, score.teacher, strict=True))
    # More than max_tokens: sequences spread over the whole set, not the first ones (packed data is in file order).
    many = [[3 + i] * 10 for i in range(100)]
    spread = CalibrationKL(model, many, max_tokens=50, batch_tokens=1000)
    assert spread.batches[0][:, 0].tolist() == [3, 23, 43, 63, 83]


# ---------------------------------------------------------------- the search


def test_kl_search_drops_an_identity_layer(tokenizer, tmp_path, calibration):
    # Layer 2 is an identity; uniform selection of 3 out of 4 keeps [0, 2, 3], so only a measurement drops it.
    teacher = _model(llama_config(len(tokenizer), hidden=32, layers=4), identity=[2])
    teacher_dir = _save(teacher, tokenizer, tmp_path / "teacher")
    lines = []
    summary = build_student(teacher_dir, tmp_path / "s", layers=3, calibration=calibration, log=lines.append)
    assert summary["kept_layers"] == [0, 1, 3]
    record = json.loads((tmp_path / "s" / "pruning.json").read_text())
    assert record["layer_selection"] == "kl"
    search = record["layer_search"]
    assert search["method"] == "exhaustive" and search["forward_passes"] == 4 and search["layer_forwards"] == 12
    assert search["calibration_kl"] == pytest.approx(0.0, abs=1e-6)
    assert any("kept by KL to the teacher" in line and "4 forward passes" in line for line in lines)
    uniform = build_student(
        teacher_dir, tmp_path / "u", layers=3, calibration=calibration, layer_selection="uniform", log=_quiet
    )
    assert uniform["kept_layers"] == [0, 2, 3]


def test_exhaustive_and_greedy_agree_where_they_must(tokenizer):
    # Two identity layers of five: the only subset of three with zero KL drops both, and each greedy round
    # can drop one of them for free, so greedy must find it too.
    model = _model(llama_config(len(tokenizer), hidden=32, layers=5), seed=3, identity=[1, 3])
    score = CalibrationKL(model, _examples(tokenizer), max_tokens=10_000)
    exhaustive = search_layers(score, 5, 3, "exhaustive")
    greedy = search_layers(score, 5, 3, "greedy")
    assert exhaustive.kept == greedy.kept == [0, 2, 4]
    assert exhaustive.kl == pytest.approx(0.0, abs=1e-6) and greedy.kl == pytest.approx(0.0, abs=1e-6)
    assert [r["dropped"] for r in greedy.rounds] == [1, 3]

    # Keeping L - 1 layers, greedy's one round scores exactly the subsets exhaustive scores.
    random_model = _model(llama_config(len(tokenizer), hidden=32, layers=4), seed=4)
    score = CalibrationKL(random_model, _examples(tokenizer), max_tokens=10_000)
    one, two = search_layers(score, 4, 3, "exhaustive"), search_layers(score, 4, 3, "greedy")
    assert one.kept == two.kept and one.kl == two.kl


def test_search_counts_and_optimality_on_synthetic_scores():
    rng = random.Random(0)
    values = {c: rng.random() for k in range(1, 8) for c in itertools.combinations(range(7), k)}
    calls = []

    def score(kept):
        calls.append(len(kept))
        return values[tuple(kept)]

    for keep in range(1, 7):
        calls.clear()
        exhaustive = search_layers(score, 7, keep, "exhaustive")
        assert exhaustive.kl == min(values[c] for c in itertools.combinations(range(7), keep))
        assert (len(calls), sum(calls)) == (exhaustive.passes, exhaustive.layer_forwards)
        assert exhaustive.layer_forwards == exhaustive_cost(7, keep)
        calls.clear()
        greedy = search_layers(score, 7, keep, "greedy")
        assert len(greedy.kept) == keep and greedy.kl >= exhaustive.kl
        assert (len(calls), sum(calls)) == (greedy.passes, greedy.layer_forwards)
        assert greedy.layer_forwards == greedy_cost(7, keep) and len(greedy.rounds) == 7 - keep

    # Additive costs (each layer's removal costs its own amount): greedy is optimal, so both must agree.
    cost = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.4]

    def additive(kept):
        return sum(c for i, c in enumerate(cost) if i not in kept)

    for keep in range(1, 7):
        assert search_layers(additive, 7, keep, "greedy").kept == search_layers(additive, 7, keep, "exhaustive").kept


@pytest.mark.parametrize(
    ("total", "keep", "method"),
    [(6, 3, "exhaustive"), (6, 5, "exhaustive"), (32, 1, "exhaustive"), (32, 2, "exhaustive"), (32, 31, "exhaustive"),
     (8, 4, "greedy"), (30, 15, "greedy"), (32, 16, "greedy")],
)  # fmt: skip
def test_auto_search_is_exhaustive_when_that_is_no_dearer(total, keep, method):
    assert search_layers(lambda kept: float(sum(kept)), total, keep).method == method
    assert (exhaustive_cost(total, keep) <= greedy_cost(total, keep)) == (method == "exhaustive")


# ---------------------------------------------------------------- the switches


def test_influence_and_the_old_name_for_it(tokenizer, tmp_path, calibration):
    teacher_dir = _save(_model(llama_config(len(tokenizer), hidden=32, layers=4), identity=[2]), tokenizer, tmp_path)
    for name in ("influence", "importance"):
        summary = build_student(
            teacher_dir, tmp_path / name, layers=3, calibration=calibration, layer_selection=name, log=_quiet
        )
        assert summary["kept_layers"] == [0, 1, 3]
        record = json.loads((tmp_path / name / "pruning.json").read_text())
        assert record["layer_selection"] == "influence" and record["layer_search"] is None


def test_bad_layer_selection_is_one_line_and_exit_2(tokenizer, tmp_path, capsys):
    teacher_dir = _save(_model(llama_config(len(tokenizer), hidden=32, layers=2)), tokenizer, tmp_path / "t")
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["student", str(teacher_dir), "--out", str(tmp_path / "s"), "--layers", "1", "--layer-selection", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "layer_selection='x'" in err and "kl, influence, uniform" in err
    assert not (tmp_path / "s").exists()
    with pytest.raises(DistillError, match="layer_search"):
        build_student(teacher_dir, tmp_path / "s", layers=1, layer_search="random", log=_quiet)


def test_cli_passes_the_layer_selection(tokenizer, tmp_path, calibration, capsys):
    teacher = _model(llama_config(len(tokenizer), hidden=32, layers=4), identity=[2])
    teacher_dir = _save(teacher, tokenizer, tmp_path / "t")
    base = ["student", str(teacher_dir), "--layers", "3", "--calibration", str(calibration)]
    assert main([*base, "--out", str(tmp_path / "kl")]) == 0
    assert main([*base, "--out", str(tmp_path / "uniform"), "--layer-selection", "uniform"]) == 0
    assert "kept by KL to the teacher" in capsys.readouterr().out
    kept = {
        name: json.loads((tmp_path / name / "pruning.json").read_text())["kept_layers"] for name in ("kl", "uniform")
    }
    assert kept == {"kl": [0, 1, 3], "uniform": [0, 2, 3]}


def test_recipe_key_layer_selection():
    def selection(value=None):
        spec = {"layers": 2} if value is None else {"layers": 2, "layer_selection": value}
        return recipe_from_dict({"teacher": {"path": "t"}, "student": {"from_teacher": spec}}).student.from_teacher

    assert selection().layer_selection == "kl"
    assert [selection(v).layer_selection for v in ("kl", "influence", "uniform")] == ["kl", "influence", "uniform"]
    assert selection("importance").layer_selection == "influence"  # the first release's name
    with pytest.raises(DistillError) as info:
        selection("best")
    message = str(info.value)
    assert message.startswith("recipe key student.from_teacher.layer_selection: ") and "\n" not in message


def test_budget_plan_says_how_it_split_depth_and_width(tokenizer, tmp_path):
    # Wide MLP, so that half the width with every layer is still over a 0.15x budget and layers must go too.
    teacher_dir = _save(_model(llama_config(len(tokenizer), hidden=64, layers=6)), tokenizer, tmp_path / "t")
    lines = []
    summary = build_student(teacher_dir, tmp_path / "s", params="0.3x", log=lines.append)
    plan = next(line for line in lines if line.startswith("params 0.3x:"))
    kept = len(summary["kept_layers"])
    assert kept < 6 and f"layers 6 -> {kept}" in plan and "Minitron" in plan and "depth buys more speed" in plan
    by_width = int(plan.split("width removes ")[1].split(" ")[0].replace(",", ""))
    by_depth = int(plan.split(", depth ")[1].split(" ")[0].replace(",", ""))
    assert by_width > 0 and by_depth > 0
    assert by_width + by_depth == summary["teacher_params"] - summary["student_params"]

    lines.clear()
    build_student(teacher_dir, tmp_path / "w", params="0.8x", log=lines.append)
    plan = next(line for line in lines if line.startswith("params 0.8x:"))
    assert "all 6 layers;" in plan and "all layers kept" in plan and "(0%)" in plan


def test_half_precision_teacher_is_measured_in_float32_and_saved_unchanged(tokenizer, tmp_path, calibration):
    teacher = _model(llama_config(len(tokenizer), hidden=32, layers=4)).to(torch.bfloat16)
    teacher_dir = _save(teacher, tokenizer, tmp_path / "t")
    summary = build_student(teacher_dir, tmp_path / "s", layers=3, calibration=calibration, log=_quiet)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype="auto")
    assert student.dtype == torch.bfloat16
    for j, i in enumerate(summary["kept_layers"]):
        # The upcast for measuring and the cast back are exact: the kept weights are the teacher's, bit for bit.
        got, want = student.model.layers[j].mlp.down_proj.weight, teacher.model.layers[i].mlp.down_proj.weight
        assert torch.equal(got, want)
