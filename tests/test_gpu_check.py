"""benchmarks/gpu_check.py's CPU path: the code the GPU check runs, on tiny sizes, every check passing.

Slow: it starts several `distill train` processes (and a one-process torchrun for FSDP2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_passes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(tmp_path / "check.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "all checks passed" in out and "FAIL" not in out
    results = json.loads((tmp_path / "check.json").read_text())
    # Every objective in both dtypes, fused against dense.
    assert len(results["loss"]) == 12 and {r["check"] for r in results["loss"]} == {"PASS"}
    runs = {r["run"]: r for r in results["train"]}
    assert {"bf16, fused loss", "bf16, dense loss", "+ gradient checkpointing", "FSDP2, 1 process"} <= set(runs)
    assert all("error" not in r for r in runs.values())
    assert [r["dtype"] for r in results["cpu"]] == ["float32", "bfloat16"]


def test_gpu_check_refuses_cuda_where_there_is_none():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no GPU" in done.stderr
