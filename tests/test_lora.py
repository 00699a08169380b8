"""LoRA students (`student.lora`): the merged student equals base + adapter, only the adapter trains, resume is
bitwise exact, the fused loss equals the plain one, self-distillation keeps one copy of the weights, several
processes give the run of one, and bad `student.lora` keys are one line with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from distill.cli import main
from distill.config import ObjectiveConfig, recipe_from_dict
from distill.losses.heads import backbone_hidden_states, output_head
from distill.models import load_model
from distill.train.loop import train
from helpers import QUIET, recipe_dict, write_recipe

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8}


def _recipe(teacher_dir, student_dir, train_file, out, lora=None, **sections):
    sections.setdefault("training", {})
    sections["training"] = {"lr": 5e-2, **sections["training"]}
    return recipe_dict(teacher_dir, student_dir, train_file, out, student={"lora": lora or LORA}, deep=True, **sections)


def _train(content) -> None:
    train(recipe_from_dict(content), **QUIET)


def _events(out, kind="train") -> list[dict]:
    events = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == kind]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, teacher_dir, student_dir, text_rows):
    tmp = tmp_path_factory.mktemp("lora")
    train_file = write_jsonl(tmp / "train.jsonl", text_rows)
    out = tmp / "run"
    _train(_recipe(teacher_dir, student_dir, train_file, out, objective={"fused": True}))
    return out


def test_merged_student_equals_base_plus_adapter(lora_run, student_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    student = lora_run / "student"
    assert not (student / "adapter_config.json").exists()  # a plain transformers folder
    merged = AutoModelForCausalLM.from_pretrained(student).eval()
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(student_dir.resolve())
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    adapted = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits  # (2, 24, V)
        with adapted.disable_adapter():
            untrained = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - untrained).abs().max() > 1e-3  # the adapter did move the student


def test_the_adapter_of_a_pruned_student_applies_to_the_init_in_the_run_folder(tmp_path, teacher_dir, train_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    content = _recipe(teacher_dir, None, train_file, out, training={"steps": 2, "eval_every": 2})
    content["student"] = {"from_teacher": {"layers": 1, "layer_selection": "uniform"}, "lora": LORA}
    _train(content)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "student-init").resolve())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "student-init"), out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "student")
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_change(lora_run, student_dir):
    base = load_file(str(student_dir / "model.safetensors"))
    merged = load_file(str(lora_run / "student" / "model.safetensors"))
    adapter = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    adapted = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in adapter}
    assert len(adapted) == 14  # q k v o gate up down in 2 layers: all-linear but the head
    scaling = LORA["alpha"] / LORA["r"]
    for name, weight in base.items():
        if name not in adapted:
            assert torch.equal(merged[name], weight), name  # embeddings, norms, biases, head: untouched
            continue
        stem = "base_model.model." + name.removesuffix(".weight")
        delta = (adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]) * scaling
        torch.testing.assert_close(merged[name], weight + delta, rtol=0, atol=1e-6)
    # Checkpoints hold the adapter and its AdamW moments only; the frozen base is rebuilt from student.path.
    checkpoint = lora_run / "checkpoints" / "step-4"
    model_keys = set(load_file(str(checkpoint / "model.safetensors")))
    assert model_keys and all(".lora_" in k for k in model_keys)
    moments = load_file(str(checkpoint / "optimizer.safetensors"))
    assert {k.rsplit("/", 1)[0] for k in moments} == model_keys
    summary = json.loads((lora_run / "student" / "summary.json").read_text())
    assert summary["student_params"] == sum(v.numel() for v in merged.values())  # as saved: merged
    assert summary["trainable_params"] == sum(v.numel() for v in adapter.values())


def test_resume_is_bitwise_exact(tmp_path, teacher_dir, student_dir, train_file):
    # Dropout on the adapter's input: the RNG state has to come back too.
    lora = {**LORA, "dropout": 0.1}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _train(_recipe(teacher_dir, student_dir, train_file, whole, lora))
    # A run killed right after its step-2 checkpoint: that checkpoint, alone in a fresh run folder.
    shutil.copytree(whole / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    assert all(".lora_" in k for k in load_file(str(cut / "checkpoints" / "step-2" / "model.safetensors")))
    train(recipe_from_dict(_recipe(teacher_dir, student_dir, train_file, cut, lora)), resume=True, **QUIET)
    assert [e["step"] for e in _events(cut)] == [3, 4]  # it did resume at step 3
    for file in ("student/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(whole / file)), load_file(str(cut / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_fused_loss_equals_plain_loss_with_an_adapter(teacher_dir, student_dir):
    from distill.train.lora import add_adapter
    from distill.train.step import StudentLoss

    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    vocab = 320
    ids = torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100
    with torch.no_grad():
        teacher_hidden = backbone_hidden_states(teacher, input_ids=ids)[:, :-1]  # (B, T-1, Ht)
        teacher_logits = teacher(input_ids=ids).logits[:, :-1, :vocab]  # (B, T-1, V)
    results = []
    for fused in (True, False):
        student = load_model(str(student_dir), "student", torch.float32)
        spec = recipe_from_dict({"student": {"lora": LORA}}).student.lora
        student = add_adapter(student, spec, seed=0, log=lambda _: None)
        with torch.no_grad():  # B = 0 at the start would hide a path that ignores the adapter
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        objective = ObjectiveConfig(divergence="jsd", ce_weight=0.3, fused=fused)
        module = StudentLoss(student, objective, vocab, output_head(teacher) if fused else None)
        signal = {"teacher_hidden": teacher_hidden} if fused else {"teacher_logits": teacher_logits}
        loss, kd_sum, ce_sum = module({"input_ids": ids}, labels, 30.0, **signal)[:3]  # [3]: the hidden-state sum
        loss.backward()
        grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        assert all(p.grad is None for p in student.parameters() if not p.requires_grad)
        results.append((loss.detach(), kd_sum, ce_sum, grads))
    (loss_f, kd_f, ce_f, grads_f), (loss_p, kd_p, ce_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_f, kd_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_f, ce_p, rtol=1e-5, atol=1e-5)
    for name, grad in grads_f.items():
        torch.testing.assert_close(grad, grads_p[name], rtol=1e-4, atol=1e-6)


def test_self_distillation_keeps_one_copy_and_starts_at_kl_zero(tmp_path, teacher_dir, train_file, monkeypatch):
    import distill.train.setup as setup
    from distill.train.lora import is_base_view

    loaded = []
    real_load_model = setup.load_model
    monkeypatch.setattr(setup, "load_model", lambda *a, **k: loaded.append(a[1]) or real_load_model(*a, **k))
    content = _recipe(
        teacher_dir,
        teacher_dir,
        train_file,
        tmp_path / "self",
        # KL to the base alone has zero gradient at the start (student == teacher); the hard labels move it.
        objective={"fused": True, "ce_weight": 1.0},
        training={"steps": 3, "save_every": 3, "eval_every": 3},
    )
    recipe = recipe_from_dict(content)
    models = setup.load_models(recipe, torch.device("cpu"), log=lambda _: None)
    assert loaded == ["student"]  # one model read from disk, no teacher copy
    assert is_base_view(models.teacher)
    student_storage = {p.untyped_storage().data_ptr() for p in models.student.parameters()}
    assert {p.untyped_storage().data_ptr() for p in models.teacher.parameters()} <= student_storage

    _train(content)
    events = _events(tmp_path / "self")
    assert events[0]["kd_loss"] == pytest.approx(0.0, abs=1e-7)  # LoRA's B = 0: the student starts as its teacher
    assert events[-1]["kd_loss"] > 1e-6  # the adapter moved it, and the teacher (adapter off) stayed put
    summary = json.loads((tmp_path / "self" / "student" / "summary.json").read_text())
    assert summary["self_distillation"] and summary["teacher_params"] == summary["student_params"]


def test_the_base_view_runs_without_the_adapter_and_without_dropout(tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import llama_config
    from distill.train.lora import BaseView, add_adapter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), attention_dropout=0.5))
    spec = recipe_from_dict({"student": {"lora": {**LORA, "dropout": 0.5}}}).student.lora
    student = add_adapter(model, spec, seed=0, log=lambda _: None)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    student.train()
    view = BaseView(student)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, second = view(input_ids=ids).logits, view(input_ids=ids).logits
        hidden = backbone_hidden_states(view, input_ids=ids)
        student.eval()
        with student.disable_adapter():
            base = student(input_ids=ids).logits
            base_hidden = backbone_hidden_states(student, input_ids=ids)
        adapted = student(input_ids=ids).logits
    assert torch.equal(first, second) and torch.equal(first, base) and torch.equal(hidden, base_hidden)
    assert not torch.allclose(adapted, base)  # the adapter is on again outside the view
    student.train()
    view(input_ids=ids)
    assert student.training and all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("signal", ["cache", "on_policy"])
def test_offline_cache_and_on_policy_train_an_adapter(tmp_path, teacher_dir, student_dir, signal):
    from distill.cache.build import build_cache

    rows = [{"prompt": f"def f{i}(x):", "completion": f"\n    return x + {i}\n"} for i in range(16)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    sections = {"objective": {"fused": True}}
    if signal == "cache":
        cache = tmp_path / "cache"
        content = recipe_dict(teacher_dir, student_dir, train_file, out, cache={"dir": str(cache)})
        build_cache(recipe_from_dict(content), **QUIET)
        sections["teacher"] = {"cache": str(cache)}
    else:
        sections["objective"]["on_policy"] = {"lambda": 1.0, "max_new_tokens": 8}
    _train(_recipe(teacher_dir, student_dir, train_file, out, training={"steps": 2, "eval_every": 2}, **sections))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in _events(out))


def _launch(tmp_path, name, content, processes) -> None:
    import os
    import socket

    recipe = write_recipe(tmp_path / f"{name}.yaml", content)
    command = [sys.executable, "-m", "distill", "train", str(recipe), "--quiet"]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the two cores of a CI machine
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _self_distillation(teacher_dir, train_file, out, distributed="auto") -> dict:
    """Self-distillation (the teacher is the student's base, adapter disabled): the hardest case for the wrappers,
    since the teacher pass runs the wrapped student outside the wrapped forward."""
    return _recipe(
        teacher_dir,
        teacher_dir,
        train_file,
        out,
        objective={"fused": True, "divergence": "jsd", "ce_weight": 0.5},
        # A moderate lr: AdamW's normalized steps amplify last-bit differences of the reduced gradients.
        training={"lr": 5e-3, "batch_size": 4, "grad_accum": 2, "eval_every": 4, "distributed": distributed},
    )


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, teacher_dir, text_rows):
    tmp = tmp_path_factory.mktemp("one")
    train_file = write_jsonl(tmp / "train.jsonl", text_rows)
    _launch(tmp, "one", _self_distillation(teacher_dir, train_file, tmp / "run"), 1)
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_train_the_adapter_of_one(tmp_path, one_process_run, teacher_dir, train_file, distributed):
    out = tmp_path / distributed
    _launch(tmp_path, distributed, _self_distillation(teacher_dir, train_file, out, distributed), 2)
    for file in ("adapter/adapter_model.safetensors", "student/model.safetensors"):
        a, b = load_file(str(one_process_run / file)), load_file(str(out / file))
        assert a.keys() == b.keys(), file
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    losses = [[e["loss"] for e in _events(run)] for run in (one_process_run, out)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("student.lora.rank=8", "student.lora.rank: unknown key"),
        ("student.lora.r=0", "student.lora.r"),
        ("student.lora.dropout=1.5", "student.lora.dropout"),
        ("student.lora.target_modules=attention", "student.lora.target_modules"),
        ("student.lora.target_modules=[no_such_layer]", "student.lora.target_modules"),
        ("student.lora.target_modules=[lm_head]", "output head"),
        ("student.lora.target_modules=[embed_tokens]", "only linear layers"),
    ],
)
def test_bad_lora_keys_are_one_line_exit_2(tmp_path, teacher_dir, student_dir, train_file, capsys, override, needle):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(teacher_dir, student_dir, train_file, tmp_path / "run"))
    assert main(["train", str(recipe), "--quiet", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_a_new_random_student_with_an_adapter_is_refused(tmp_path, teacher_dir, train_file, capsys):
    content = _recipe(teacher_dir, None, train_file, tmp_path / "run")
    content["student"] = {"config": {"model_type": "llama", "hidden_size": 32}, "lora": LORA}
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 2
    assert "recipe key student.lora" in capsys.readouterr().err


def test_missing_peft_names_the_extra(monkeypatch):
    from distill.errors import DistillError
    from distill.train.lora import _peft

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(DistillError, match=r"distill\[peft\]"):
        _peft()
