"""Online and on-policy training from a teacher behind an OpenAI-compatible server (`teacher.endpoint`, no
`teacher.cache`), against `distill serve` on 127.0.0.1: the same losses as training from a cache that server built
of the same rows, requests a step ahead, exact resume, on-policy samples scored by the server, one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import distill.train.step as step_module
import helpers
from distill.cache.build import build_cache
from distill.cache.served import ServedTeacher
from distill.cli import main
from distill.config import recipe_from_dict
from distill.train.loop import train
from helpers import QUIET, final_weights
from test_cache_endpoint import start_server


@pytest.fixture(scope="module")
def url(teacher_dir):
    from distill.generate.server import load_served_model

    base, server = start_server(load_served_model(str(teacher_dir), "teacher", "float32", "cpu"))
    yield base
    server.should_exit = True


def recipe_dict(teacher_dir, student_dir, train_file, out, url, **sections) -> dict:
    defaults = {
        "student": {"tokenizer": str(teacher_dir)},
        "cache": {"top_k": 8, "precision": "float32", "pack_ids": False, "shard_tokens": 200},
        "generate": {"concurrency": 4, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 30},
        "training": {"steps": 4, "save_every": 10, "eval_every": 10},
    }
    content = helpers.recipe_dict(teacher_dir, student_dir, train_file, out, defaults, deep=True, **sections)
    content["teacher"] = {"endpoint": url, "model_name": "teacher"}
    return content


def train_losses(out) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


@pytest.mark.parametrize("fused", [False, True])
def test_online_from_the_server_equals_training_from_its_cache(
    tmp_path, teacher_dir, student_dir, train_file, url, fused, monkeypatch
):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "online", url, objective={"fused": fused})
    # While step s trains, step s + 1's requests are already out.
    ahead_at_loss = []
    real = step_module.step_loss

    def watching(loss_module, models, batch, recipe, normalizer, signal):
        ahead_at_loss.append(sorted(signal._asked))
        return real(loss_module, models, batch, recipe, normalizer, signal)

    monkeypatch.setattr(step_module, "step_loss", watching)
    online = train(recipe_from_dict(content), **QUIET)
    monkeypatch.setattr(step_module, "step_loss", real)
    assert online.summary["teacher_params"] is None
    assert ahead_at_loss[:3] == [[1], [2], [3]] and ahead_at_loss[3] == []

    cache_dir = tmp_path / "cache"
    build_cache(recipe_from_dict(content, {"cache.dir": str(cache_dir)}), **QUIET)
    cached = {**content, "teacher": {"cache": str(cache_dir)}, "output": {"dir": str(tmp_path / "cached")}}
    from_cache = train(recipe_from_dict(cached), **QUIET)

    a, b = train_losses(online.output_dir), train_losses(from_cache.output_dir)
    assert len(a) == 4 and all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    wa, wb = final_weights(online.output_dir), final_weights(from_cache.output_dir)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7)


def test_resume_is_exact(tmp_path, teacher_dir, student_dir, train_file, url, monkeypatch):
    def content(out):
        return recipe_dict(
            teacher_dir, student_dir, train_file, out, url, training={"steps": 6, "save_every": 2, "grad_accum": 2}
        )

    train(recipe_from_dict(content(tmp_path / "straight")), **QUIET)
    real, calls = step_module.step_loss, {"n": 0}

    def crash_in_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:  # the first micro-batch of the fifth step, after checkpoint step-4
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(step_module, "step_loss", crash_in_step_5)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed"):
        train(recipe_from_dict(content(crashed)), **QUIET)
    monkeypatch.setattr(step_module, "step_loss", real)
    train(recipe_from_dict(content(crashed)), resume=True, **QUIET)
    a, b = final_weights(tmp_path / "straight"), final_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"


def test_on_policy_samples_are_scored_by_the_server(tmp_path, teacher_dir, student_dir, train_file, url, monkeypatch):
    scored: list[list[int]] = []
    real = ServedTeacher.score

    def spy(self, ids):
        scored.append(list(ids))
        return real(self, ids)

    monkeypatch.setattr(ServedTeacher, "score", spy)
    content = recipe_dict(
        teacher_dir,
        student_dir,
        train_file,
        tmp_path / "on-policy",
        url,
        objective={"divergence": "reverse_kl", "on_policy": {"lambda": 1.0, "max_new_tokens": 12}},
        training={"steps": 3},
    )
    result = train(recipe_from_dict(content), **QUIET)
    losses = train_losses(result.output_dir)
    assert len(losses) == 3 and all(np.isfinite(losses)) and all(x > 0 for x in losses)
    from distill.data import load_data
    from distill.models import load_tokenizer

    examples, _ = load_data(recipe_from_dict(content), load_tokenizer(str(teacher_dir), "teacher"), lambda _: None)
    fixed = {tuple(e.input_ids) for e in examples}
    # Every step is on-policy, so nothing of the fixed data is asked ahead: exactly the 3 steps × 4 samples, nearly
    # all of them new text (a short row whose sampled end is its own EOS is itself again).
    assert len(scored) == 3 * 4
    assert sum(tuple(ids) not in fixed for ids in scored) >= 10
    events = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["on_policy_share"] for e in events if e["event"] == "train"] == [1.0, 1.0, 1.0]


def test_refusals_are_one_line(tmp_path, teacher_dir, student_dir, train_file, url, capsys):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", url)
    path = helpers.write_recipe(tmp_path / "recipe.yaml", content)
    for override, message in [
        ("cache.top_k=32", "recipe key cache.top_k"),
        ("data.packing=true", "recipe key data.packing"),
        ("teacher.model_name=nope", "recipe key teacher.model_name"),
    ]:
        assert main(["train", str(path), override, "--quiet"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
