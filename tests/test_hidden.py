"""Hidden-state distillation (`objective.hidden`): the per-token math by hand, layer pairs, fused == plain, the
global-batch normalization, exact resume of the projections, what the saved student holds, refusals, DDP/FSDP2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.cli import main
from distill.config import recipe_from_dict
from distill.data import build_examples, collate
from distill.losses.hidden import (
    auto_layer_pairs,
    hidden_loss_sum,
    new_projections,
    resolve_layer_pairs,
    token_hidden_loss,
)
from distill.models import Models, load_model
from distill.train.loop import train
from distill.train.step import StudentLoss, step_loss
from helpers import QUIET, final_weights, recipe_dict, write_recipe

HIDDEN = {"weight": 0.5, "loss": "mse", "layers": "auto"}


def _events(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the math


def test_per_token_losses_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 2.0]])  # (5, 2)
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [3.0, 0.0]])  # (5, 2)
    cosine = token_hidden_loss(s, t, "cosine")  # (5,)
    assert cosine.shape == (5,)
    # orthogonal, 45°, same direction (norms do not matter), opposite, cos = 3 / (√5 · 3)
    expected = torch.tensor([1.0, 1.0 - 1.0 / math.sqrt(2.0), 0.0, 2.0, 1.0 - 1.0 / math.sqrt(5.0)])
    torch.testing.assert_close(cosine, expected)
    mse = token_hidden_loss(s, t, "mse")
    torch.testing.assert_close(mse, torch.tensor([1.0, 0.5, 0.5, 2.0, 4.0]))  # e.g. ((1-3)² + (2-0)²) / 2 = 4


def test_the_sum_counts_masked_tokens_and_averages_over_pairs():
    # Two pairs, three tokens of width 2; the middle token is padding and holds a NaN that must not leak.
    s1 = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 2.0]])
    t1 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    s2 = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    t2 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([True, False, True])
    # mse per token: pair 1 -> [0.5, -, 2.0], pair 2 -> [2.0, -, 0.0]; mean over pairs [1.25, 1.0]; sum 2.25
    got = hidden_loss_sum([s1, s2], [t1, t2], mask, "mse")
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(2.25))


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_identical_states_give_zero(loss):
    states = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))  # (B, T, H)
    mask = torch.ones(3, 7, dtype=torch.bool)
    assert float(hidden_loss_sum([states, states * 1.0], [states, states], mask, loss)) == pytest.approx(0, abs=1e-5)
    # and half precision states come back as a float32 sum
    assert hidden_loss_sum([states.bfloat16()], [states.bfloat16()], mask, loss).dtype == torch.float32


def test_auto_pairs_are_evenly_spaced_and_pair_the_last_layers():
    assert auto_layer_pairs(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert auto_layer_pairs(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # 1.5 -> 2, 4.5 -> 5: halves round up
    assert auto_layer_pairs(2, 2) == [(1, 1), (2, 2)]
    assert auto_layer_pairs(1, 32) == [(1, 32)]
    for s, t in [(3, 7), (5, 32), (12, 36), (6, 4)]:
        pairs = auto_layer_pairs(s, t)
        assert pairs[-1] == (s, t) and len(pairs) == s
        assert all(a[1] <= b[1] for a, b in zip(pairs, pairs[1:], strict=False))
    assert resolve_layer_pairs([[0, 0], [2, 6]], 3, 6) == [(0, 0), (2, 6)]
    with pytest.raises(ValueError, match="student layer 4"):
        resolve_layer_pairs([[4, 1]], 3, 6)
    with pytest.raises(ValueError, match="teacher layer 7"):
        resolve_layer_pairs([[1, 7]], 3, 6)


def test_projections_are_bias_free_seeded_and_leave_the_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = new_projections(2, 32, 64, seed=3), new_projections(2, 32, 64, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert [p.weight.shape for p in a] == [torch.Size([64, 32])] * 2 and all(p.bias is None for p in a)
    assert all(torch.equal(p.weight, q.weight) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0].weight, a[1].weight)


# ---------------------------------------------------------------- the loss module


def _batch(tokenizer, train_file):
    examples, _ = build_examples(train_file, tokenizer, 48)
    batch = collate(examples[:4], tokenizer.pad_token_id)
    batch["labels"][0, :3] = -100  # a few non-loss tokens besides the padding
    return batch


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_fused_and_plain_paths_agree_with_hidden_states(tokenizer, teacher_dir, student_dir, train_file, loss):
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    batch = _batch(tokenizer, train_file)
    counted = float((batch["labels"] != -100).sum())
    results = []
    for fused in (True, False):
        content = recipe_dict(teacher_dir, student_dir, train_file, "unused")
        content["objective"] = {
            "fused": fused,
            "divergence": "jsd",
            "ce_weight": 0.3,
            "hidden": {**HIDDEN, "loss": loss},
        }
        r = recipe_from_dict(content)
        student = load_model(str(student_dir), "student", torch.float32)
        models = Models(student=student, teacher=teacher, tokenizer=tokenizer, vocab_size=len(tokenizer))
        module = StudentLoss(student, r.objective, len(tokenizer), None, [(1, 1), (2, 2)], 64, seed=0)
        if fused:
            from distill.losses.heads import output_head

            module.teacher_head = output_head(teacher)
        out = step_loss(module, models, batch, r, counted, None)
        out[0].backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        results.append((out, grads))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    for a, b in zip(fused_out, plain_out, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert float(fused_out[3]) > 0
    assert {"hidden_projections.0.weight", "hidden_projections.1.weight"} <= set(fused_grads)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused_grads["hidden_projections.0.weight"].abs().max() > 0


def test_the_hidden_term_is_its_weight_times_the_mean_over_loss_tokens(tokenizer, teacher_dir, student_dir, train_file):
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    student = load_model(str(student_dir), "student", torch.float32)
    batch = _batch(tokenizer, train_file)
    mask = batch["labels"] != -100
    losses = {}
    for weight in (0.0, 2.0):
        content = recipe_dict(teacher_dir, student_dir, train_file, "unused")
        content["objective"] = {"fused": False, "hidden": {"weight": weight, "loss": "cosine", "layers": [[2, 1]]}}
        r = recipe_from_dict(content)
        module = StudentLoss(student, r.objective, len(tokenizer), None, [(2, 1)], 64, seed=0)
        models = Models(student=student, teacher=teacher, tokenizer=tokenizer, vocab_size=len(tokenizer))
        losses[weight] = step_loss(module, models, batch, r, float(mask.sum()), None)
    assert float(losses[0.0][3]) == 0.0 and losses[0.0][0].shape == ()
    # By hand: the student's state after layer 2 (the final norm's output), projected, against the teacher's layer 1.
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        projected = module.hidden_projections[0](s.hidden_states[2][:, :-1])  # (B, T-1, 64)
        cos = torch.nn.functional.cosine_similarity(projected, t.hidden_states[1][:, :-1], dim=-1)  # (B, T-1)
        by_hand = ((1 - cos) * mask).sum()
    torch.testing.assert_close(losses[2.0][3], by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[2.0][0] - losses[0.0][0], 2.0 * by_hand / mask.sum(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- training runs


def test_eight_micro_batches_of_one_equal_one_batch_of_eight(
    tmp_path, teacher_dir, student_dir, train_file, monkeypatch
):
    def sgd(groups, lr, **_):  # updates proportional to the gradient: a wrong normalization would show
        return torch.optim.SGD(groups, lr=lr)

    monkeypatch.setattr("distill.train.setup.torch.optim.AdamW", sgd)
    results = []
    for accum in (1, 8):
        out = tmp_path / f"run-{accum}"
        content = recipe_dict(
            teacher_dir,
            student_dir,
            train_file,
            out,
            data={"max_length": 32},
            training={"steps": 1, "batch_size": 8, "grad_accum": accum, "max_grad_norm": None, "eval_batches": 1},
            objective={"ce_weight": 0.5, "hidden": HIDDEN},
        )
        train(recipe_from_dict(content), **QUIET)
        saved = load_file(str(out / "checkpoints" / "step-1" / "model.safetensors"))
        results.append(({k: v for k, v in saved.items() if k.startswith("hidden_")}, final_weights(out)))
        assert {e["hidden_loss"] > 0 for e in _events(out) if e["event"] == "train"} == {True}
    (proj_one, one), (proj_eight, eight) = results
    start = load_file(str(student_dir / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(one[name] - start[name], eight[name] - start[name], rtol=1e-4, atol=1e-7)
    assert set(proj_one) == {"hidden_projections.0.weight", "hidden_projections.1.weight"}
    first = new_projections(2, 32, 64, seed=0)  # where both runs started (training.seed 0)
    for i, name in enumerate(sorted(proj_one)):
        moved = proj_one[name] - first[i].weight.detach()
        torch.testing.assert_close(moved, proj_eight[name] - first[i].weight.detach(), rtol=1e-4, atol=1e-7)
        assert moved.abs().max() > 0


def test_resume_restores_projections_bitwise_and_the_student_is_saved_without_them(
    tmp_path, teacher_dir, student_dir, train_file
):
    out = tmp_path / "run"
    content = recipe_dict(
        teacher_dir, student_dir, train_file, out, objective={"fused": True, "ce_weight": 0.2, "hidden": HIDDEN}
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", content)
    assert main(["train", str(recipe), "--quiet"]) == 0
    straight = {
        "checkpoint": load_file(str(out / "checkpoints" / "step-4" / "model.safetensors")),
        "optimizer": load_file(str(out / "checkpoints" / "step-4" / "optimizer.safetensors")),
        "student": final_weights(out),
    }
    train_events = [e for e in _events(out) if e["event"] == "train"]
    assert len(train_events) == 4 and all(e["hidden_loss"] > 0 for e in train_events)

    # The saved student is the student alone: no projection, and it loads as a plain model with nothing left over.
    assert not any("hidden" in k for k in straight["student"])
    own = load_model(str(student_dir), "student", torch.float32).state_dict()
    assert set(straight["student"]) == set(own)
    assert json.loads((out / "student" / "summary.json").read_text())["student_params"] == sum(
        p.numel() for p in load_model(str(student_dir), "student", torch.float32).parameters()
    )
    assert {"hidden_projections.0.weight", "hidden_projections.1.weight"} <= set(straight["checkpoint"])
    assert any(k.startswith("hidden_projections.0.weight/") for k in straight["optimizer"])  # its AdamW moments

    shutil.rmtree(out / "checkpoints" / "step-4")  # as a kill after step 2 would leave it
    assert (out / "checkpoints" / "step-2").is_dir()  # so the resumed run starts from step 2's projections
    assert main(["train", str(recipe), "--quiet", "--resume"]) == 0
    resumed = load_file(str(out / "checkpoints" / "step-4" / "model.safetensors"))
    assert resumed.keys() == straight["checkpoint"].keys()
    assert all(torch.equal(resumed[k], straight["checkpoint"][k]) for k in resumed)  # projections included
    optimizer = load_file(str(out / "checkpoints" / "step-4" / "optimizer.safetensors"))
    assert all(torch.equal(optimizer[k], straight["optimizer"][k]) for k in optimizer)
    student = final_weights(out)
    assert all(torch.equal(student[k], straight["student"][k]) for k in student)


def test_on_policy_steps_distil_hidden_states_too(tmp_path, teacher_dir, student_dir, train_file):
    content = recipe_dict(
        teacher_dir,
        student_dir,
        train_file,
        tmp_path / "run",
        training={"steps": 1, "save_every": 1},
        objective={"fused": True, "on_policy": {"lambda": 1.0, "max_new_tokens": 6}, "hidden": HIDDEN},
    )
    train(recipe_from_dict(content), **QUIET)
    events = [e for e in _events(tmp_path / "run") if e["event"] == "train"]
    assert [e["on_policy_share"] for e in events] == [1.0]  # the step on the student's own samples
    assert all(e["hidden_loss"] > 0 for e in events)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "hidden, expected",
    [
        ({"layers": [[3, 1]]}, "objective.hidden.layers: student layer 3 of pair [3, 1] does not exist"),
        ({"layers": [[1, 9]]}, "objective.hidden.layers: teacher layer 9 of pair [1, 9] does not exist"),
        ({"layers": [[1, 2, 3]]}, "objective.hidden.layers: entry 0 ([1, 2, 3]) is not a [student_layer, teacher"),
        ({"layers": [1, 2]}, "objective.hidden.layers: entry 0 (1) is not a [student_layer, teacher_layer] pair"),
        ({"layers": "middle"}, "objective.hidden.layers: give auto or a list of [student_layer, teacher_layer]"),
        ({"layers": [[1, -1]]}, "objective.hidden.layers: entry 0 ([1, -1]): layer numbers start at 0"),
        ({"layers": []}, "objective.hidden.layers: an empty list pairs no layers"),
        ({"loss": "l1"}, "objective.hidden.loss"),
        ({"weight": -1}, "objective.hidden.weight"),
    ],
)
def test_bad_hidden_settings_fail_with_one_line(
    tmp_path, capsys, teacher_dir, student_dir, train_file, hidden, expected
):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run")
    content["objective"]["hidden"] = {"weight": 1.0, **hidden}
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "teacher, objective, expected",
    [
        ({"cache": "some-cache"}, {}, "a teacher.cache stores output distributions, not hidden states"),
        ({"endpoint": "http://127.0.0.1:9/v1"}, {}, "a served teacher (teacher.endpoint) sends output distributions"),
        ({}, {"kd_weight": 0.0, "ce_weight": 1.0}, "the hidden-state term is added to the logit loss"),
        ({}, {"cross_tokenizer": "uld"}, "across tokenizers the teacher's positions are not the student's"),
        (None, {}, "it pairs the student's layers with one teacher's; use teacher instead of teachers"),
    ],
)
def test_hidden_states_need_a_teacher_run_here(
    tmp_path, capsys, teacher_dir, student_dir, train_file, teacher, objective, expected
):
    content = recipe_dict(
        teacher_dir, student_dir, train_file, tmp_path / "run", teacher=teacher or {}, objective=objective
    )
    if teacher is None:  # several teachers
        content["teachers"] = {"a": content.pop("teacher"), "b": {"path": str(teacher_dir)}}
    content["objective"]["hidden"] = {"weight": 1.0}
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "recipe key objective.hidden.weight: " in err and expected in err and "\n" not in err, err


# ---------------------------------------------------------------- several processes


def _distributed_run(tmp_path, name, teacher_dir, student_dir, train_file, processes, strategy="ddp"):
    from test_distributed import _train

    content = recipe_dict(
        teacher_dir,
        student_dir,
        train_file,
        tmp_path / name,
        training={"steps": 3, "batch_size": 8, "grad_accum": 2, "save_every": 3, "eval_every": 3},
        objective={"fused": True, "ce_weight": 0.2, "hidden": HIDDEN},
    )
    content["training"]["distributed"] = strategy
    _train(processes, write_recipe(tmp_path / f"{name}.yaml", content))
    return tmp_path / name


@pytest.fixture(scope="module")
def single_hidden_run(tmp_path_factory, teacher_dir, student_dir, text_rows):
    from conftest import write_jsonl

    tmp_path = tmp_path_factory.mktemp("hidden-single")
    train_file = write_jsonl(tmp_path / "train.jsonl", text_rows)
    return _distributed_run(tmp_path, "single", teacher_dir, student_dir, train_file, processes=1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_hidden_states(
    tmp_path, single_hidden_run, teacher_dir, student_dir, train_file, strategy
):
    one = single_hidden_run
    two = _distributed_run(tmp_path, strategy, teacher_dir, student_dir, train_file, processes=2, strategy=strategy)
    hidden = [[e["hidden_loss"] for e in _events(run) if e["event"] == "train"] for run in (one, two)]
    assert len(hidden[1]) == 3
    torch.testing.assert_close(torch.tensor(hidden[1]), torch.tensor(hidden[0]), rtol=1e-5, atol=1e-6)
    for file in ("student/model.safetensors", "checkpoints/step-3/model.safetensors"):
        a, b = load_file(str(one / file)), load_file(str(two / file))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{file}: {name}")
    assert any(
        k.startswith("hidden_projections.") for k in load_file(str(two / "checkpoints/step-3/model.safetensors"))
    )
