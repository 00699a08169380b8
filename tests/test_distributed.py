"""Several processes on CPU (gloo): DDP and FSDP2 runs match a 1-process run with the same global batch, and a
2-process run killed and resumed finishes like an uninterrupted one.

Each run is `torchrun --nproc_per_node 2 -m distill train RECIPE`, exactly as a user launches it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from helpers import final_weights, recipe_dict, write_recipe

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(processes: int, recipe: Path, *extra: str) -> list[str]:
    distill = ["-m", "distill", "train", str(recipe), "--quiet", *extra]
    if processes == 1:
        return [sys.executable, *distill]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_free_port())]
    return [sys.executable, *launcher, *distill]


def _env() -> dict[str, str]:
    # One thread per process: two processes share the two cores of a CI machine.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(processes: int, recipe: Path, *extra: str) -> None:
    done = subprocess.run(_command(processes, recipe, *extra), capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    events = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def _recipe(tmp_path, name, teacher_dir, student_dir, train_file, **training) -> Path:
    content = recipe_dict(
        teacher_dir,
        student_dir,
        train_file,
        tmp_path / name,
        # Global batch 8 = 2 processes × 2 micro-batches × 2 sequences, or 1 process × 2 × 4.
        training={"steps": STEPS, "batch_size": 8, "grad_accum": 2, "save_every": 2, "eval_every": 3, **training},
        objective={"fused": True, "divergence": "jsd", "ce_weight": 0.2},
    )
    return write_recipe(tmp_path / f"{name}.yaml", content)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, teacher_dir, student_dir, text_rows) -> Path:
    tmp_path = tmp_path_factory.mktemp("single")
    train_file = write_jsonl(tmp_path / "train.jsonl", text_rows)
    recipe = _recipe(tmp_path, "single", teacher_dir, student_dir, train_file)
    _train(1, recipe, "--resume")
    return tmp_path / "single"


def _assert_same_run(run: Path, reference: Path) -> None:
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(reference)), rtol=1e-5, atol=1e-6)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_ranks_split_every_epoch_without_repeats():
    """Each rank takes its slice of the global batch: over one epoch every example is seen exactly once."""
    from distill.data import step_example_indices

    examples, batch, world = 40, 8, 2
    seen = []
    for step in range(examples // batch):
        indices = step_example_indices(examples, seed=3, step=step, batch_size=batch)
        per_rank = [indices[r * batch // world : (r + 1) * batch // world] for r in range(world)]
        assert not set(per_rank[0]) & set(per_rank[1])
        seen += [i for part in per_rank for i in part]
    assert sorted(seen) == list(range(examples))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, single_run, teacher_dir, student_dir, train_file, strategy):
    recipe = _recipe(tmp_path, strategy, teacher_dir, student_dir, train_file, distributed=strategy)
    _train(2, recipe)
    run = tmp_path / strategy
    assert len(_losses(run)) == STEPS
    _assert_same_run(run, single_run)
    # The checkpoint holds whole tensors keyed by name, whatever the sharding: the student's weights are all there.
    saved = load_file(str(run / "checkpoints" / f"step-{STEPS}" / "model.safetensors"))
    assert set(final_weights(run)) <= {k.removeprefix("student.") for k in saved}


@pytest.mark.slow
def test_two_process_fsdp_run_killed_and_resumed_finishes_like_an_uninterrupted_one(
    tmp_path, single_run, teacher_dir, student_dir, train_file
):
    recipe = _recipe(tmp_path, "killed", teacher_dir, student_dir, train_file, distributed="fsdp", save_every=1)
    run = tmp_path / "killed"
    process = subprocess.Popen(
        _command(2, recipe, "--resume"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,  # the launcher and its workers form one process group: kill them all at once
    )
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-2").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "student").exists(), "the run finished before it could be killed"
    _train(2, recipe, "--resume")
    assert len(_losses(run)) == STEPS  # steps redone after the kill are logged once
    _assert_same_run(run, single_run)


def test_accelerate_fsdp_launch_is_refused_with_the_fix(tmp_path, teacher_dir, student_dir, train_file, monkeypatch):
    from distill.config import recipe_from_dict
    from distill.errors import DistillError
    from distill.train.loop import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = recipe_from_dict(recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run"))
    with pytest.raises(DistillError, match="training.distributed=fsdp"):
        train(recipe, show_progress=False, log=lambda _: None)
