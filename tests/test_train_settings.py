"""The settings of a real-size run, each checked against the run without it: gradient checkpointing, attention
implementation, torch.compile, the teacher's device and a bfloat16 teacher.

Updates are compared with plain SGD at lr 1 and no clipping (as tests/test_train.py does for fused vs plain): AdamW's
first step is about lr·sign(g), which would turn float noise in a near-zero gradient into a full-size difference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import QUIET, final_weights, recipe_dict, write_recipe


def _sgd(groups, lr, **_):
    return torch.optim.SGD(groups, lr=lr)


def _recipe(teacher_dir, student_dir, train_file, out, **sections) -> dict:
    """One SGD step over 4 sequences, fused jsd + CE (every path of the fused loss's backward)."""
    base = {
        "training": {"steps": 1, "batch_size": 4, "max_grad_norm": None, "lr": 1.0, "eval_every": 1000},
        "objective": {"fused": True, "divergence": "jsd", "ce_weight": 0.3},
    }
    return recipe_dict(teacher_dir, student_dir, train_file, out, defaults=base, deep=True, **sections)


def _train(content: dict):
    from distill.config import recipe_from_dict
    from distill.train.loop import train

    return train(recipe_from_dict(content), **QUIET)


def _losses(out: Path) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def _update(out: Path, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = final_weights(out)
    return {k: weights[k] - start[k] for k in start}


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_checkpointing_gives_the_same_update(
    tmp_path, teacher_dir, student_dir, train_file, monkeypatch, fused
):
    """The same SGD update with and without recomputed activations (float32; tolerance 1e-6 absolute, 1e-5
    relative: a recompute performs the same operations, only the order of accumulation may differ), and the
    checkpoint function really runs once per student layer and micro-batch, through the fused loss's backbone call.
    `selective` (products kept, elementwise ops recomputed) replays the same ops on the same inputs: bitwise equal."""
    import transformers.modeling_utils as modeling_utils

    from distill.train.recompute import keep_products_only

    monkeypatch.setattr("distill.train.setup.torch.optim.AdamW", _sgd)
    calls = []
    real_checkpoint = modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append((kwargs.get("use_reentrant"), kwargs.get("context_fn")))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)
    start = load_file(str(student_dir / "model.safetensors"))
    updates = {}
    for checkpointing in (False, True, "selective"):
        out = tmp_path / f"run-{checkpointing}"
        content = _recipe(
            teacher_dir,
            student_dir,
            train_file,
            out,
            training={"gradient_checkpointing": checkpointing},
            objective={"fused": fused},
        )
        _train(content)
        updates[checkpointing] = _update(out, start)
    # non-reentrant, only in the runs that asked for it: the tiny student's two layers, one micro-batch each
    assert calls == [(False, None)] * 2 + [(False, keep_products_only)] * 2
    for name, plain in updates[False].items():
        assert plain.abs().max() > 0, name
        torch.testing.assert_close(updates[True][name], plain, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(updates["selective"][name], plain), name


def test_selective_checkpointing_keeps_products_and_gives_bitwise_gradients():
    """On a padded Llama batch of 4 x 64 tokens, selective checkpointing gives bitwise the gradients of no
    checkpointing; matrix products and attention are kept, elementwise ops recomputed. What it saves in memory
    is measured by benchmarks/train_step_memory.py --compare checkpointing (README)."""
    from torch.utils.checkpoint import CheckpointPolicy
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.train.recompute import _policy
    from distill.train.setup import enable_gradient_checkpointing

    aten = torch.ops.aten
    assert _policy(None, aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, aten.silu.default) == CheckpointPolicy.PREFER_RECOMPUTE
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2:, 40:] = 0  # padding: the masked attention path, as in training

    def gradients(selective: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).train()
        if selective:
            enable_gradient_checkpointing(model, selective=True)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden.float() ** 2).sum().backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    plain, selective = gradients(False), gradients(True)
    assert len(selective) == len(plain) > 0
    assert all(torch.equal(a, b) for a, b in zip(selective, plain, strict=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, "selective"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_checkpointing_under_two_processes_matches_one_process_without(
    tmp_path, teacher_dir, student_dir, train_file, strategy, checkpointing
):
    """2 processes (gloo) with checkpointing on, full or selective, give the 1-process run's losses and weights
    (tolerances of tests/test_distributed.py: 1e-5 relative on losses, 1e-4 on weights)."""
    runs = {}
    for name, processes, extra in (("single", 1, {}), (strategy, 2, {"distributed": strategy})):
        out = tmp_path / name
        content = _recipe(
            teacher_dir,
            student_dir,
            train_file,
            out,
            training={
                "steps": 2,
                "batch_size": 4,
                "lr": 1e-2,
                "gradient_checkpointing": processes == 2 and checkpointing,
                **extra,
            },
        )
        recipe = write_recipe(tmp_path / f"{name}.yaml", content)
        command = [sys.executable, "-m", "distill", "train", str(recipe), "--quiet"]
        if processes == 2:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
            command = [sys.executable, *launcher, *command[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = out
    single, multi = runs["single"], runs[strategy]
    torch.testing.assert_close(torch.tensor(_losses(multi)), torch.tensor(_losses(single)), rtol=1e-5, atol=1e-6)
    a, b = final_weights(multi), final_weights(single)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_checkpointing_is_refused_for_a_model_without_it(monkeypatch):
    from distill.errors import DistillError
    from distill.train.setup import enable_gradient_checkpointing

    model = torch.nn.Linear(2, 2)
    with pytest.raises(DistillError, match="training.gradient_checkpointing"):
        enable_gradient_checkpointing(model)


# ---------------------------------------------------------------- attention implementation


def test_sdpa_and_eager_attention_give_the_same_losses(tmp_path, teacher_dir, student_dir, train_file):
    """Both models under sdpa vs eager: two steps' losses agree to float32 noise (1e-5 relative), and the models
    really ran with the asked-for implementation."""
    from distill.train import setup

    seen = []
    real_load = setup.load_model

    def recording_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        seen.append(model.config._attn_implementation)
        return model

    losses = {}
    for implementation in ("sdpa", "eager"):
        out = tmp_path / implementation
        content = _recipe(
            teacher_dir,
            student_dir,
            train_file,
            out,
            teacher={"attn_implementation": implementation},
            student={"attn_implementation": implementation},
            training={"steps": 2, "lr": 1e-2},
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(setup, "load_model", recording_load)
            _train(content)
        losses[implementation] = _losses(out)
    assert seen == ["sdpa", "sdpa", "eager", "eager"]
    torch.testing.assert_close(torch.tensor(losses["sdpa"]), torch.tensor(losses["eager"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_flash_attention_is_refused_on_cpu_with_one_line(tmp_path, capsys, teacher_dir, student_dir, train_file, role):
    from distill.cli import main

    content = _recipe(teacher_dir, student_dir, train_file, tmp_path / "run", training={"device": "cpu"})
    recipe = write_recipe(tmp_path / "r.yaml", content)
    assert main(["train", str(recipe), "--quiet", f"{role}.attn_implementation=flash_attention_2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"recipe key {role}.attn_implementation" in err and "flash_attention_2" in err


def test_flash_attention_without_the_package_is_refused(monkeypatch):
    import importlib.util

    from distill.errors import DistillError
    from distill.models import attn_implementation

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistillError, match="flash_attn package"):
        attn_implementation("flash_attention_2", torch.device("cuda", 0), "recipe key student.attn_implementation")
    assert attn_implementation("auto", torch.device("cpu"), "k") is None
    assert attn_implementation("eager", torch.device("cpu"), "k") == "eager"


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path, teacher_dir, student_dir, train_file):
    """training.compile: a 2-step run (fused loss, gradient checkpointing on too) gives the eager run's losses and
    weights; tolerance 1e-4 relative: inductor fuses and reorders float32 arithmetic."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        content = _recipe(
            teacher_dir,
            student_dir,
            train_file,
            out,
            training={"steps": 2, "lr": 1e-2, "compile": compiled, "gradient_checkpointing": True},
        )
        _train(content)
        runs[compiled] = out
    torch.testing.assert_close(
        torch.tensor(_losses(runs[True])), torch.tensor(_losses(runs[False])), rtol=1e-4, atol=1e-6
    )
    a, b = final_weights(runs[True]), final_weights(runs[False])
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_layers_replaces_each_decoder_layers_forward(student_dir):
    from transformers import AutoModelForCausalLM

    from distill.train.setup import compile_layers

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    names = set(model.state_dict())
    assert compile_layers(model) == model.config.num_hidden_layers
    assert all("forward" in vars(layer.self_attn) and "forward" in vars(layer.mlp) for layer in model.model.layers)
    assert set(model.state_dict()) == names  # no wrapper module: checkpoints keep their keys


# ---------------------------------------------------------------- teacher device and dtype


def test_teacher_on_cpu_beside_a_cpu_student_is_the_same_run(tmp_path, teacher_dir, student_dir, train_file):
    losses = {}
    for device in ("auto", "cpu"):
        out = tmp_path / device
        content = _recipe(
            teacher_dir,
            student_dir,
            train_file,
            out,
            teacher={"device": device},
            training={"steps": 2, "lr": 1e-2, "device": "cpu", "eval_every": 2},
        )
        _train(content)
        losses[device] = _losses(out)
    assert losses["auto"] == losses["cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_teacher_on_a_missing_gpu_is_refused_with_one_line(tmp_path, capsys, teacher_dir, student_dir, train_file):
    from distill.cli import main

    content = _recipe(teacher_dir, student_dir, train_file, tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", content)
    assert main(["train", str(recipe), "--quiet", "teacher.device=cuda:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "recipe key teacher.device" in err and "no GPU" in err
    assert main(["train", str(recipe), "--quiet", "teacher.device=tpu"]) == 2
    assert "recipe key teacher.device" in capsys.readouterr().err


def test_head_on_copies_only_across_devices():
    from distill.losses.heads import OutputHead
    from distill.train.setup import head_on

    head = OutputHead(torch.randn(8, 4), torch.randn(8), logit_scale=0.5)
    assert head_on(head, torch.device("cpu")) is head
    moved = head_on(head, torch.device("meta"))
    assert moved.weight.device.type == "meta" and moved.bias.device.type == "meta" and moved.logit_scale == 0.5


# Stated tolerance of a bfloat16 teacher: the first step's loss (the same student, the same batch) within 1% of the
# float32 teacher's. bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per value); measured here the
# loss moved by 1.4e-4 relative, fused and plain alike, so 1% leaves room for other tiny models without hiding a bug
# (a teacher computed wrongly in bf16 moves a divergence by far more than 1%).
BF16_TEACHER_RTOL = 0.01


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_teacher_loss_stays_within_tolerance_of_fp32(tmp_path, teacher_dir, student_dir, train_file, fused):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        content = _recipe(
            teacher_dir,
            student_dir,
            train_file,
            out,
            teacher={"dtype": dtype},
            objective={"fused": fused, "ce_weight": 0.0, "divergence": "forward_kl"},
        )
        _train(content)
        losses[dtype] = _losses(out)[0]
    assert losses["float32"] > 0
    assert abs(losses["bfloat16"] - losses["float32"]) <= BF16_TEACHER_RTOL * losses["float32"], losses


# ---------------------------------------------------------------- start-up costs


def test_the_fused_head_check_runs_each_model_once(teacher_dir):
    """verify_output_head takes the backbone's states from inside the model's own forward: one pass, not two; and
    it still catches a head that does not reproduce the logits."""
    from transformers import AutoModelForCausalLM

    from distill.losses.heads import OutputHead, backbone, output_head, verify_output_head

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    calls = []
    backbone(model).register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 100, (1, 16))
    verify_output_head(model, ids)
    assert len(calls) == 1
    head = output_head(model)
    with pytest.raises(ValueError, match="does not reproduce"):
        verify_output_head(model, ids, head=OutputHead(head.weight, head.bias, logit_scale=2.0))


def test_help_does_not_import_transformers():
    """`distill --help` (and `distill config show`) start without transformers, torch's and accelerate's imports."""
    probe = (
        "import sys; from distill.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('transformers', 'torch', 'accelerate', 'datasets', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_command_skips_the_last_garbage_collection(monkeypatch, tmp_path):
    """The `distill` command freezes the heap after its work (the interpreter's last collection cost 1.5 s), and
    still exits with main's code: a user mistake is exit 2 with one line, through the console script's path."""
    import gc

    import tomllib

    from distill import cli

    calls = []
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 3)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    assert cli.console() == 3 and calls == ["main", "freeze"]
    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["distill"] == "distill.cli:console"
    missing = tmp_path / "missing.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "distill", "train", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("distill: error:") and len(done.stderr.strip().splitlines()) == 1


def test_fsdp_on_one_process_needs_a_launcher():
    """training.distributed=fsdp under `torchrun --nproc_per_node 1` shards (benchmarks/gpu_check.py runs it on one
    GPU); a plain one-process run stays unwrapped."""
    from distill.train.parallel import pick_strategy

    assert pick_strategy("fsdp", 1) == "single"
    assert pick_strategy("auto", 2) == "ddp" and pick_strategy("fsdp", 2) == "fsdp"


# ---------------------------------------------------------------- the fused loss's chunk budget


def test_fused_chunk_budget_reaches_the_loss_and_leaves_the_update_unchanged(
    tmp_path, teacher_dir, student_dir, train_file, monkeypatch
):
    """objective.fused_chunk_mib reaches the fused loss as its memory budget, and the run is the same run (that
    other chunkings give the same sums is tests/test_fused.py's)."""
    import distill.losses.fused as fused_module

    budgets, real = [], fused_module.fused_loss_sums

    def spy(*args, **kwargs):
        budgets.append(kwargs.get("memory_budget_bytes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_module, "fused_loss_sums", spy)
    losses = {}
    for mib in (256, 1):
        out = tmp_path / f"mib{mib}"
        _train(_recipe(teacher_dir, student_dir, train_file, out, objective={"fused_chunk_mib": mib}))
        losses[mib] = _losses(out)
    assert set(budgets) == {256 * 2**20, 2**20}
    assert losses[1] == pytest.approx(losses[256], rel=1e-5)
