"""Several teachers in one run (recipe key `teachers`): each row's targets come from its own teacher (a mixed
micro-batch's loss is the sum of each teacher's, computed by hand with the dense reference), 8 × 1 == 1 × 8, exact
resume, a cached and an online teacher mixed, on-policy, the per-teacher report, one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import distill.train.teachers as teachers_module
import helpers
from conftest import CORPUS, llama_config, save_model, write_jsonl
from distill.cache.build import build_cache
from distill.cli import main
from distill.config import recipe_from_dict
from distill.losses import distillation_loss
from distill.train.loop import train
from distill.train.onpolicy import OnPolicy
from distill.train.setup import pick_accelerator, prepare_output, set_up
from distill.train.step import step_batches, step_loss
from helpers import QUIET, final_weights, write_recipe


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, tokenizer):
    """Another tiny teacher with the same tokenizer and other weights."""
    folder = tmp_path_factory.mktemp("teacher-b")
    return save_model(llama_config(len(tokenizer) + 16, hidden=64), tokenizer, folder, seed=7)


def rows(n: int = 24) -> list[dict]:
    return [{"text": CORPUS[i % len(CORPUS)] + f" {i}", "teacher": "a" if i % 3 else "b"} for i in range(n)]


@pytest.fixture()
def files(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", rows())
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows(8))
    return train_file, eval_file


def recipe_dict(teacher_dir, second_teacher, student_dir, files, out, **sections) -> dict:
    defaults = {
        "student": {"tokenizer": str(teacher_dir)},
        "data": {"eval": str(files[1])},
        "training": {"steps": 4, "batch_size": 4, "save_every": 2, "eval_every": 2},
    }
    content = helpers.recipe_dict(teacher_dir, student_dir, files[0], out, defaults, deep=True, **sections)
    del content["teacher"]
    # float32 teachers, as in helpers.recipe_dict: these tests compare runs to float32 precision
    fp32 = {"dtype": "float32"}
    content["teachers"] = {"a": {"path": str(teacher_dir), **fp32}, "b": {"path": str(second_teacher), **fp32}}
    return content


def train_losses(out) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


@pytest.mark.parametrize("fused", [False, True])
def test_a_mixed_batch_is_the_sum_of_each_teachers_loss(
    tmp_path, teacher_dir, second_teacher, student_dir, files, fused
):
    content = recipe_dict(teacher_dir, second_teacher, student_dir, files, tmp_path / "run", objective={"fused": fused})
    content["training"]["batch_size"] = 6
    recipe = recipe_from_dict(content)
    accelerator = pick_accelerator(recipe)
    out, _ = prepare_output(recipe, False)
    run = set_up(recipe, accelerator, out, None, QUIET["log"])
    on_policy = OnPolicy(recipe, run.models.tokenizer, run.train_examples, accelerator.device, accelerator.autocast)
    [batch], tokens = step_batches(run, recipe, 0, on_policy, accelerator)
    names = [run.train_examples[i].teacher for i in batch["example_index"].tolist()]
    assert set(names) == {"a", "b"}, "the test needs a micro-batch that mixes teachers"
    assert batch["teacher_index"].tolist() == [0 if n == "a" else 1 for n in names]
    loss, kd_sum, _, _ = step_loss(run.loss_module, run.models, batch, recipe, float(tokens), run.teacher_signal)

    # By hand: each teacher's logits on its own rows, the dense reference's mean times its token count, summed.
    from transformers import AutoModelForCausalLM

    expected = torch.zeros(())
    student = run.models.student
    for name, folder in (("a", teacher_dir), ("b", second_teacher)):
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        mine = torch.tensor([i for i, n in enumerate(names) if n == name])
        ids, mask = batch["input_ids"][mine], batch["attention_mask"][mine]
        labels = batch["labels"][mine]
        counted = labels != -100
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, : run.models.vocab_size]
            s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1, : run.models.vocab_size]
        mean = distillation_loss(s_logits, t_logits, divergence="forward_kl", mask=counted)
        expected = expected + mean * counted.sum()
    torch.testing.assert_close(kd_sum.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.detach(), expected / tokens, rtol=1e-4, atol=1e-6)
    # Routing matters: the same rows scored by teacher a alone give another sum.
    run.teacher_signal.index = {"a": 0, "b": 0}
    batch["teacher_index"] = run.teacher_signal.teacher_index([run.train_examples[i] for i in batch["example_index"]])
    _, kd_a, _, _ = step_loss(run.loss_module, run.models, batch, recipe, float(tokens), run.teacher_signal)
    assert abs(float(kd_a) - float(expected)) > 1e-3


@pytest.mark.slow
def test_eight_micro_batches_of_one_equal_one_of_eight(tmp_path, teacher_dir, second_teacher, student_dir, files):
    def run(out, accum):
        training = {"batch_size": 8, "grad_accum": accum, "steps": 2}
        return train(
            recipe_from_dict(recipe_dict(teacher_dir, second_teacher, student_dir, files, out, training=training)),
            **QUIET,
        )

    run(tmp_path / "one", 1)
    run(tmp_path / "eight", 8)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "eight")
    # Summation order differs between the two (8 partial sums vs one): Adam divides by sqrt(v), so a weight whose
    # gradient is near 0 moves by a few 1e-6 more or less (measured 2.5e-6 on one of 10240); a wrong normalizer
    # would move every weight by lr-sized amounts (5e-3).
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(train_losses(tmp_path / "one"), train_losses(tmp_path / "eight"), rtol=1e-5)


@pytest.mark.slow
def test_resume_is_exact(tmp_path, teacher_dir, second_teacher, student_dir, files, monkeypatch):
    def content(out):
        training = {"steps": 4, "save_every": 2, "grad_accum": 2}
        return recipe_dict(teacher_dir, second_teacher, student_dir, files, out, training=training)

    train(recipe_from_dict(content(tmp_path / "straight")), **QUIET)
    real, calls = teachers_module.Teachers.step_loss, {"n": 0}

    def crash_in_step_3(self, *args):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # the first micro-batch of the third step, after checkpoint step-2
            raise RuntimeError("killed")
        return real(self, *args)

    monkeypatch.setattr(teachers_module.Teachers, "step_loss", crash_in_step_3)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed"):
        train(recipe_from_dict(content(crashed)), **QUIET)
    monkeypatch.setattr(teachers_module.Teachers, "step_loss", real)
    train(recipe_from_dict(content(crashed)), resume=True, **QUIET)
    a, b = final_weights(tmp_path / "straight"), final_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"


@pytest.mark.slow
def test_a_cached_and_an_online_teacher_mixed(tmp_path, teacher_dir, second_teacher, student_dir, files, tokenizer):
    # Teacher b's cache: its own rows alone, built by a single-teacher recipe (the key is ignored there).
    vocab = len(tokenizer)
    cache = {"top_k": vocab, "precision": "float32", "tail_samples": 0, "pack_ids": False, "dir": str(tmp_path / "c")}
    only_b = write_jsonl(tmp_path / "b.jsonl", [r for r in rows() if r["teacher"] == "b"])
    single = helpers.recipe_dict(second_teacher, student_dir, only_b, tmp_path / "unused", cache=cache)
    single["data"].update(eval=str(files[1]), ignore_keys=["teacher"])
    build_cache(recipe_from_dict(single), **QUIET)

    online = recipe_dict(teacher_dir, second_teacher, student_dir, files, tmp_path / "online", cache=cache)
    mixed = recipe_dict(teacher_dir, second_teacher, student_dir, files, tmp_path / "mixed", cache=cache)
    mixed["teachers"]["b"] = {"cache": cache["dir"]}
    train(recipe_from_dict(online), **QUIET)
    train(recipe_from_dict(mixed), **QUIET)
    # The cache holds every token's log-prob (top_k = the vocabulary): the same losses as running teacher b here.
    np.testing.assert_allclose(train_losses(tmp_path / "online"), train_losses(tmp_path / "mixed"), rtol=1e-4)


@pytest.mark.slow
def test_on_policy_and_the_per_teacher_report(tmp_path, teacher_dir, second_teacher, student_dir, files, monkeypatch):
    prompt_rows = [
        {"prompt": CORPUS[i % len(CORPUS)][:12], "completion": f" {i} tokens", "teacher": "ab"[i % 2]}
        for i in range(12)
    ]
    train_file = write_jsonl(tmp_path / "pc.jsonl", prompt_rows)
    content = recipe_dict(
        teacher_dir,
        second_teacher,
        student_dir,
        (train_file, files[1]),
        tmp_path / "run",
        objective={"on_policy": {"lambda": 1.0, "max_new_tokens": 6}},
        training={"steps": 2},
        report={"enabled": True, "speed": False, "draft": False},
    )
    seen = []
    real = teachers_module.Teachers.step_loss

    def watching(self, loss_module, models, batch, *args):
        seen.append(batch["teacher_index"].tolist())
        return real(self, loss_module, models, batch, *args)

    monkeypatch.setattr(teachers_module.Teachers, "step_loss", watching)
    result = train(recipe_from_dict(content), **QUIET)
    assert all(np.isfinite(train_losses(result.output_dir)))
    assert any(0 in s and 1 in s for s in seen)  # on-policy batches mixing teachers were routed
    report = json.loads((result.output_dir / "report.json").read_text())
    assert set(report["by_teacher"]) == {"a", "b"}
    for name in ("a", "b"):
        entry = report["by_teacher"][name]
        assert {"teacher", "student", "retention"} <= set(entry)
        assert entry["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
        assert entry["student"]["kl_to_teacher"] > 0
    assert (result.output_dir / "by_teacher" / "b" / "report.json").exists()


def test_bad_routing_is_one_line(tmp_path, teacher_dir, second_teacher, student_dir, files, capsys):
    from helpers import byte_level_tokenizer

    other = save_model(llama_config(400, hidden=32), byte_level_tokenizer(), tmp_path / "other", seed=3)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", rows() + [{"text": "x y z", "teacher": "c"}])
    missing = write_jsonl(tmp_path / "missing.jsonl", rows() + [{"text": "x y z"}])
    capsys.readouterr()  # saving the other teacher's shards showed a progress bar
    cases = [
        ({"data": {"train": str(unknown)}}, "'c' is not one of recipe key teachers (a, b)"),
        ({"data": {"train": str(missing)}}, 'no "teacher" key'),
        ({"teachers": {"a": {"path": str(teacher_dir)}, "b": {"dtype": "float32"}}}, "teachers.b: give its path"),
        ({"teacher": {"path": str(teacher_dir)}}, "give either teacher or teachers"),
        ({"teachers": {"a": {"path": str(teacher_dir)}, "b": {"path": str(other)}}}, "teachers.b: its tokenizer"),
        ({"data": {"packing": True}}, "data.packing"),
    ]
    for i, (change, expected) in enumerate(cases):
        content = recipe_dict(teacher_dir, second_teacher, student_dir, files, tmp_path / f"out{i}")
        helpers.merge_sections(content, change)
        path = write_recipe(tmp_path / f"r{i}.yaml", content)
        assert main(["train", str(path), "--quiet"]) == 2, expected
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines


def test_distill_cache_on_a_teachers_recipe_says_what_to_do(tmp_path, teacher_dir, second_teacher, student_dir, files):
    # It used to say "needs teacher.path", which a recipe with two teachers' paths does not explain.
    content = recipe_dict(teacher_dir, second_teacher, student_dir, files, tmp_path / "out")
    path = write_recipe(tmp_path / "r.yaml", content)
    result = subprocess.run([sys.executable, "-m", "distill", "cache", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "once per teacher" in lines[0], lines


@pytest.mark.slow
def test_a_served_teacher_beside_an_online_one(tmp_path, teacher_dir, second_teacher, student_dir, files):
    from distill.generate.server import load_served_model
    from test_cache_endpoint import start_server

    url, server = start_server(load_served_model(str(second_teacher), "teacher", "float32", "cpu"))
    try:
        cache = {"top_k": 8, "precision": "float32", "tail_samples": 0, "pack_ids": False, "dir": str(tmp_path / "c")}
        generate = {"concurrency": 4, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 30}
        only_b = write_jsonl(tmp_path / "b.jsonl", [r for r in rows() if r["teacher"] == "b"])
        single = helpers.recipe_dict(second_teacher, student_dir, only_b, tmp_path / "unused", cache=cache)
        single["data"].update(eval=str(files[1]), ignore_keys=["teacher"])
        build_cache(recipe_from_dict(single), **QUIET)  # teacher b's top-8, run here

        served = recipe_dict(
            teacher_dir, second_teacher, student_dir, files, tmp_path / "served", cache=cache, generate=generate
        )
        served["teachers"]["b"] = {"endpoint": url, "model_name": "teacher"}
        cached = recipe_dict(teacher_dir, second_teacher, student_dir, files, tmp_path / "cached", cache=cache)
        cached["teachers"]["b"] = {"cache": cache["dir"]}
        train(recipe_from_dict(served), **QUIET)
        train(recipe_from_dict(cached), **QUIET)
    finally:
        server.should_exit = True
    # The server's top-8 log-probs (float32) are the local teacher's: the same losses as its cache.
    np.testing.assert_allclose(train_losses(tmp_path / "served"), train_losses(tmp_path / "cached"), rtol=1e-4)
