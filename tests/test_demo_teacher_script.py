"""scripts/train_demo_teacher.py: its recipe options and exporting a checkpoint of a real (one-step) run."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.config import recipe_from_dict
from distill.demo.run import TEACHER_DIR
from distill.models import new_model_from_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_teacher.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_demo_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_first_teachers_commands_keep_their_recipe(script, tmp_path):
    # TRAINING.md of the first teacher: `train --steps 600`, fp32 on CPU, lr 2e-3, 50 warm-up steps, batch 8.
    training = script.recipe(tmp_path, 600)["training"]
    assert (training["lr"], training["warmup_steps"], training["batch_size"]) == (2.0e-3, 50, 8)
    assert "mixed_precision" not in training
    recipe_from_dict(script.recipe(tmp_path, 600))


def test_options_reach_the_recipe_and_bf16_is_accepted_on_cpu(script, tmp_path):
    options = {"lr": 1e-3, "warmup": 7, "batch_size": 4, "mixed_precision": "bf16", "eval_every": 100}
    recipe = recipe_from_dict(script.recipe(tmp_path, 300, options))
    t = recipe.training
    assert (t.lr, t.warmup_steps, t.batch_size, t.mixed_precision, t.eval_every) == (1e-3, 7, 4, "bf16", 100)
    assert t.device == "cpu"


def test_export_of_a_checkpoint_has_the_weights_the_run_trained(script, tmp_path):
    """A checkpoint stores the loss module's weights (`student.` names): export must load them, not refuse them."""
    from distill.train.loop import train

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(TEACHER_DIR, work / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors"))
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n" * 40
    for name in ("train.jsonl", "eval.jsonl"):
        (work / name).write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(4)))
    content = script.recipe(work, 1, {"batch_size": 2})
    content["training"].update(save_every=1, eval_every=1, eval_batches=1)
    torch.set_num_threads(1)
    train(recipe_from_dict(content), show_progress=False)

    checkpoint = work / "run" / "checkpoints" / "step-1"
    exported = script._load_trained(work, checkpoint, torch.float32).state_dict()
    final = script._load_trained(work, work / "run" / "student", torch.float32).state_dict()
    assert exported.keys() == final.keys()
    for name, weight in final.items():
        assert torch.equal(exported[name], weight), name
    untrained = new_model_from_config(script.MODEL, script.VOCAB_SIZE, torch.float32, seed=0).state_dict()
    assert any(not torch.equal(exported[name], untrained[name]) for name in untrained)  # it is the trained model
