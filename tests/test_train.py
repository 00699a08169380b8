"""The training loop end to end: outputs, learning, global-batch normalization, exact resume, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPORT_MODEL_KEYS
from distill.cli import main
from distill.config import recipe_from_dict
from distill.data import build_examples, iter_batches
from distill.models import load_model, load_tokenizer
from distill.report.quality import evaluate_batches
from distill.train.loop import train
from helpers import final_weights, recipe_dict, write_recipe


def held_out_kl(model_dir, teacher_dir, eval_file) -> float:
    tokenizer = load_tokenizer(str(teacher_dir), "teacher")
    examples, _ = build_examples(eval_file, tokenizer, 48)
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    model = load_model(str(model_dir), "student", torch.float32).eval()
    batches = iter_batches(examples, 4, tokenizer.pad_token_id)
    return evaluate_batches(model, teacher, batches, len(tokenizer), torch.device("cpu"))["kl_to_teacher"]


@pytest.mark.slow
def test_cli_trains_writes_outputs_and_moves_student_toward_teacher(
    tmp_path, teacher_dir, student_dir, train_file, eval_file
):
    out = tmp_path / "run"
    content = recipe_dict(
        teacher_dir,
        student_dir,
        train_file,
        out,
        training={"steps": 12, "lr": 1e-2},
        data={"eval": str(eval_file)},
        report={"enabled": True},
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", content)
    assert main(["train", str(recipe), "--quiet"]) == 0

    student = out / "student"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "summary.json"):
        assert (student / name).exists(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-12"]
    events = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train_events] == list(range(1, 13))
    assert all({"loss", "tokens_per_s", "kd_loss", "ce_loss"} <= set(e) for e in train_events)

    report = json.loads((out / "report.json").read_text())
    assert {"teacher", "student"} <= set(report["models"])
    assert all(set(report["models"][name]) >= REPORT_MODEL_KEYS for name in ("teacher", "student"))
    assert {"top1_accuracy", "cross_entropy", "agreement"} <= set(report["retention"]["student"])
    assert {"decode", "params"} <= set(report["speedup"]["student"])
    assert (out / "report.html").exists() and (out / "report.md").exists()

    # Plain transformers loads the result, its parameters changed, and it moved toward the teacher.
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(student)
    before = load_file(str(student_dir / "model.safetensors"))
    after = trained.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert held_out_kl(student, teacher_dir, eval_file) < 0.8 * held_out_kl(student_dir, teacher_dir, eval_file)


def test_eight_micro_batches_of_one_equal_one_batch_of_eight(
    tmp_path, teacher_dir, student_dir, train_file, monkeypatch
):
    # Plain SGD makes the update proportional to the gradient; AdamW's first steps are close to sign(gradient),
    # which would hide a wrong normalization by a constant factor.
    def sgd(groups, lr, **_):
        return torch.optim.SGD(groups, lr=lr)

    monkeypatch.setattr("distill.train.setup.torch.optim.AdamW", sgd)
    results = []
    for accum in (1, 8):
        content = recipe_dict(
            teacher_dir,
            student_dir,
            train_file,
            tmp_path / f"run-{accum}",
            training={"steps": 2, "batch_size": 8, "grad_accum": accum, "max_grad_norm": None},
            objective={"ce_weight": 0.5},
        )
        train(recipe_from_dict(content), show_progress=False, log=lambda _: None)
        results.append(final_weights(tmp_path / f"run-{accum}"))
    one, eight = results
    start = load_file(str(student_dir / "model.safetensors"))
    for name in one:
        # Compare the updates, not the weights, so the tolerance is relative to what training changed.
        torch.testing.assert_close(one[name] - start[name], eight[name] - start[name], rtol=1e-4, atol=1e-7)
    assert any((one[name] - start[name]).abs().max() > 1e-4 for name in one)


def test_hard_label_training_needs_no_teacher(tmp_path, tokenizer, teacher_dir, train_file):
    content = recipe_dict(None, None, train_file, tmp_path / "run", objective={"kd_weight": 0.0, "ce_weight": 1.0})
    content["teacher"] = {}
    content["student"] = {
        "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
        "tokenizer": str(teacher_dir),
    }
    result = train(recipe_from_dict(content), show_progress=False, log=lambda _: None)
    assert result.summary["teacher_params"] is None
    assert (result.student_dir / "model.safetensors").exists()


def _run_cli(args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, timeout=600, **kwargs
    )


@pytest.mark.slow
def test_sigkill_and_resume_give_bitwise_identical_weights(tmp_path, teacher_dir, student_dir, train_file):
    steps = 16
    common = {"training": {"steps": steps, "save_every": 3, "log_every": 1, "eval_every": 5}}
    straight = write_recipe(
        tmp_path / "straight.yaml", recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "straight", **common)
    )
    assert _run_cli(["train", str(straight), "--quiet"]).returncode == 0

    killed_dir = tmp_path / "killed"
    killed = write_recipe(
        tmp_path / "killed.yaml", recipe_dict(teacher_dir, student_dir, train_file, killed_dir, **common)
    )
    kills = 0
    # Kill twice, at moments that depend on how far the run got, then let it finish.
    for wait_for in ("step-3", "step-9"):
        process = subprocess.Popen(
            [sys.executable, "-m", "distill", "train", str(killed), "--quiet", "--resume"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while not (killed_dir / "checkpoints" / wait_for).exists() and process.poll() is None:
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += process.returncode == -signal.SIGKILL
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    assert not (killed_dir / "student").exists()
    finished = _run_cli(["train", str(killed), "--quiet", "--resume"])
    assert finished.returncode == 0, finished.stderr

    a, b = final_weights(tmp_path / "straight"), final_weights(killed_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    # Events of steps redone after a kill are logged once.
    events = [yaml.safe_load(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, steps + 1))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(
    tmp_path, teacher_dir, student_dir, train_file, monkeypatch
):
    import distill.train.step as step_module

    real = step_module.step_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss, kd, ce, hidden = real(*args)
        return (loss * float("nan"), kd * float("nan"), ce, hidden) if calls["n"] == 3 else (loss, kd, ce, hidden)

    monkeypatch.setattr(step_module, "step_loss", poisoned)
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", training={"steps": 6})
    from distill.errors import DistillError

    with pytest.raises(DistillError, match=r"step 3.*step-2"):
        train(recipe_from_dict(content), show_progress=False, log=lambda _: None)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-2"]
    assert not (tmp_path / "run" / "student").exists()


# ---------------------------------------------------------------- bad input: one line, exit code 2


def _bad(tmp_path, capsys, content, *extra) -> str:
    recipe = write_recipe(tmp_path / "bad.yaml", content)
    assert main(["train", str(recipe), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_bad_inputs_fail_with_one_line(tmp_path, capsys, tokenizer, teacher_dir, student_dir, train_file):
    def base(**sections):
        return recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", **sections)

    missing = base()
    missing["teacher"]["path"] = str(tmp_path / "nope")
    assert "teacher folder" in _bad(tmp_path, capsys, missing)
    assert "divergence" in _bad(tmp_path, capsys, base(objective={"divergence": "kl"}))
    assert "objective.beta" in _bad(tmp_path, capsys, base(objective={"beta": 1.5}))
    assert "objective.skew" in _bad(tmp_path, capsys, base(objective={"skew": 1.0}))
    assert "objective.temperature" in _bad(tmp_path, capsys, base(objective={"temperature": -1}))
    assert "data.max_length" in _bad(tmp_path, capsys, base(data={"max_length": 100000}))
    assert "training.stepz" in _bad(tmp_path, capsys, base(training={"stepz": 3}))
    assert "training.steps" in _bad(tmp_path, capsys, base(training={"steps": "many"}))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no usable examples" in _bad(tmp_path, capsys, base(data={"train": str(empty)}))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    assert f"{broken}:2" in _bad(tmp_path, capsys, base(data={"train": str(broken)}))

    # A student with its own, different tokenizer (fewer merges: the teacher's tokens beyond 300 are missing).
    from conftest import llama_config, save_model, train_tokenizer

    other = save_model(llama_config(400), train_tokenizer(vocab_size=300), tmp_path / "other", seed=3)
    assert "tokenizers differ" in _bad(tmp_path, capsys, base(student={"path": str(other)}))


def test_existing_run_needs_resume(tmp_path, capsys, teacher_dir, student_dir, train_file):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", training={"steps": 2})
    recipe = write_recipe(tmp_path / "r.yaml", content)
    assert main(["train", str(recipe), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(recipe), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    weights = final_weights(tmp_path / "run")
    # Resuming a finished run changes nothing.
    assert main(["train", str(recipe), "--quiet", "--resume"]) == 0
    after = final_weights(tmp_path / "run")
    assert all(torch.equal(weights[k], after[k]) for k in weights)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_and_plain_training_give_the_same_update(
    tmp_path, teacher_dir, student_dir, train_file, monkeypatch, divergence
):
    def sgd(groups, lr, **_):
        return torch.optim.SGD(groups, lr=lr)

    monkeypatch.setattr("distill.train.setup.torch.optim.AdamW", sgd)
    start = load_file(str(student_dir / "model.safetensors"))
    updates = []
    for fused in (False, True):
        out = tmp_path / f"run-{fused}"
        content = recipe_dict(
            teacher_dir,
            student_dir,
            train_file,
            out,
            training={"steps": 2, "batch_size": 4, "max_grad_norm": None, "lr": 1.0},
            objective={"fused": fused, "divergence": divergence, "temperature": 2.0, "ce_weight": 0.3},
        )
        train(recipe_from_dict(content), show_progress=False, log=lambda _: None)
        weights = final_weights(out)
        updates.append({k: weights[k] - start[k] for k in start})
    plain, fused = updates
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6)
