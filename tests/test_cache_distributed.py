"""`distill cache` under torchrun with 2 processes (gloo, CPU): one consistent cache, byte for byte the same as a
one-process build, also when it finishes a partial build."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.cache.build import build_cache
from distill.config import load_recipe, recipe_from_dict
from helpers import QUIET


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe_file(tmp_path: Path, teacher_dir, train_file, cache_dir: Path, name: str) -> Path:
    content = {
        "teacher": {"path": str(teacher_dir)},
        "data": {"train": str(train_file), "max_length": 48},
        "training": {"device": "cpu"},
        "cache": {
            "dir": str(cache_dir),
            "top_k": 8,
            "representation": "both",
            "sample_m": 6,
            "shard_tokens": 60,
            "precision": "float16",
            "pack_ids": False,
            "tail_samples": 0,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_from_dict(content).model_dump(by_alias=True)))
    return path


def _run(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a one-process build must not look like a rank of some outer launch
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _torchrun(recipe: Path, tmp_path: Path) -> None:
    port = str(_free_port())
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    _run([*launch, "-m", "distill", "cache", str(recipe), "--quiet"], tmp_path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_process_build_equals_one_process_build_and_resumes(tmp_path, teacher_dir, train_file):
    single, double, resumed = tmp_path / "single", tmp_path / "double", tmp_path / "resumed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun worker, so that float reductions run in the same order
    try:
        build_cache(load_recipe(str(_recipe_file(tmp_path, teacher_dir, train_file, single, "one"))), **QUIET)
    finally:
        torch.set_num_threads(threads)
    _torchrun(_recipe_file(tmp_path, teacher_dir, train_file, double, "two"), tmp_path)

    manifest = json.loads((single / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 4  # enough shards that both ranks wrote some
    reference = _files(single)
    assert _files(double) == reference  # every shard, the tokenizer files and the manifest, byte for byte

    # A build killed part-way: its plan on disk, some shards written, no manifest. Two processes finish it.
    shutil.copytree(single, resumed)
    (resumed / "manifest.json").rename(resumed / "build.json")  # a plan with the same shard list
    for shard in manifest["shards"][1::2]:
        (resumed / shard["file"]).unlink()
    (resumed / ".shard-00001.safetensors.tmp-123").write_bytes(b"half a shard")
    _torchrun(_recipe_file(tmp_path, teacher_dir, train_file, resumed, "resumed"), tmp_path)
    assert _files(resumed) == reference
