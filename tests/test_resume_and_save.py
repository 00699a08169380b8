"""Resume refuses what changed; the student is saved in its dtype; logged gradient norms; the DDP normalizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import llama_config, write_jsonl
from distill.cli import main
from distill.config import recipe_from_dict
from distill.train.loop import train
from helpers import recipe_dict, write_recipe


def _run(tmp_path, recipe_content, *args) -> int:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_content)
    return main(["train", str(recipe), "--quiet", *args])


def _stopped_at_step_2(tmp_path, content: dict) -> None:
    """Run the recipe (4 steps, a checkpoint every 2), then drop the last checkpoint, as a kill after step 2 would."""
    import shutil

    assert _run(tmp_path, content) == 0
    shutil.rmtree(content["output"]["dir"] + "/checkpoints/step-4")


def test_resume_refuses_a_training_file_rewritten_in_place(tmp_path, teacher_dir, student_dir, train_file, capsys):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", training={"save_every": 2})
    _stopped_at_step_2(tmp_path, content)
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    write_jsonl(train_file, [{"text": r["text"].upper()} for r in rows])  # same path, same recipe, other text
    capsys.readouterr()
    assert _run(tmp_path, content, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "training examples differ" in err and "data.train" in err and "\n" not in err


@pytest.mark.parametrize(
    "key, value",
    [("steps", 8), ("warmup_steps", 1), ("min_lr_ratio", 0.5), ("schedule", "linear"), ("max_grad_norm", 0.5)],
)
def test_resume_refuses_changed_schedule_settings(tmp_path, teacher_dir, student_dir, train_file, capsys, key, value):
    out = tmp_path / "run"
    content = recipe_dict(teacher_dir, student_dir, train_file, out, training={"steps": 2, "save_every": 2})
    assert _run(tmp_path, content) == 0
    content["training"][key] = value
    capsys.readouterr()
    assert _run(tmp_path, content, "--resume") == 2
    assert f"training.{key} changed" in capsys.readouterr().err


def test_resume_allows_bookkeeping_changes(tmp_path, teacher_dir, student_dir, train_file):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", training={"save_every": 2})
    _stopped_at_step_2(tmp_path, content)
    content["training"].update({"log_every": 2, "eval_every": 1, "keep_checkpoints": 3})
    assert _run(tmp_path, content, "--resume") == 0


def _dtypes(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.fixture()
def bf16_student_dir(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), hidden=32, tie_word_embeddings=True))
    folder = tmp_path / "bf16-student"
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_a_bf16_student_is_saved_in_bf16_and_loads_with_transformers(
    tmp_path, teacher_dir, bf16_student_dir, train_file
):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    recipe = recipe_from_dict(recipe_dict(teacher_dir, bf16_student_dir, train_file, out, training={"steps": 2}))
    result = train(recipe, log=lambda _: None, show_progress=False)
    assert _dtypes(result.student_dir) == {"BF16"}
    assert json.loads((result.student_dir / "config.json").read_text())["dtype"] == "bfloat16"
    # About half the float32 size (tied embeddings stay tied: one copy).
    start = (bf16_student_dir / "model.safetensors").stat().st_size
    assert (result.student_dir / "model.safetensors").stat().st_size <= 1.05 * start
    loaded = AutoModelForCausalLM.from_pretrained(result.student_dir)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_output_dtype_overrides_auto(tmp_path, teacher_dir, bf16_student_dir, train_file, student_dir):
    recipe = recipe_from_dict(
        recipe_dict(teacher_dir, bf16_student_dir, train_file, tmp_path / "a", output={"dtype": "float32"})
    )
    assert _dtypes(train(recipe, log=lambda _: None, show_progress=False).student_dir) == {"F32"}
    # A float32 student stays float32 under auto.
    recipe = recipe_from_dict(recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "b"))
    assert _dtypes(train(recipe, log=lambda _: None, show_progress=False).student_dir) == {"F32"}


def test_a_student_pruned_from_a_bf16_teacher_is_saved_in_bf16(tmp_path, tokenizer, train_file):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    teacher = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), hidden=64, layers=4))
    teacher_folder = tmp_path / "bf16-teacher"
    teacher.to(torch.bfloat16).save_pretrained(teacher_folder)
    tokenizer.save_pretrained(teacher_folder)
    content = recipe_dict(teacher_folder, teacher_folder, train_file, tmp_path / "run", training={"steps": 2})
    content["student"] = {"from_teacher": {"layers": 2}}
    result = train(recipe_from_dict(content), log=lambda _: None, show_progress=False)
    assert _dtypes(result.student_dir) == {"BF16"}


def test_grad_norm_is_logged_when_clipping_is_off(tmp_path, teacher_dir, student_dir, train_file):
    out = tmp_path / "run"
    content = recipe_dict(teacher_dir, student_dir, train_file, out, training={"steps": 2, "max_grad_norm": None})
    train(recipe_from_dict(content), log=lambda _: None, show_progress=False)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    norms = [e["grad_norm"] for e in events if e["event"] == "train"]
    assert norms and all(n > 0 and torch.isfinite(torch.tensor(n)) for n in norms)


def test_fused_loss_divides_by_a_normalizer_below_one():
    """Under DDP each rank divides by (global loss tokens) / world size, below 1 with fewer tokens than ranks."""
    from distill.losses.fused import fused_loss_sums
    from distill.losses.heads import OutputHead
    from distill.losses.objective import Objective

    torch.manual_seed(0)
    hidden = torch.randn(1, 3, 8, requires_grad=True)
    head = OutputHead(weight=torch.randn(16, 8))
    labels = torch.tensor([[-100, 5, -100]])
    teacher_hidden = torch.randn(1, 3, 8)
    common = dict(
        objective=Objective(),
        teacher_hidden=teacher_hidden,
        teacher_head=OutputHead(weight=torch.randn(16, 8)),
        vocab_size=16,
    )
    loss_half, kd_sum, _ = fused_loss_sums(hidden, head, labels, normalizer=0.5, **common)
    loss_one, _, _ = fused_loss_sums(hidden, head, labels, normalizer=1.0, **common)
    assert torch.allclose(loss_half, 2 * loss_one)
    assert torch.allclose(loss_one, kd_sum)


def test_bad_output_dtype_is_one_line(tmp_path, teacher_dir, student_dir, train_file, capsys):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", output={"dtype": "int8"})
    assert _run(tmp_path, content) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "output.dtype" in err
