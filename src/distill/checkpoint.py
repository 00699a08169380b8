"""Resumable training state, written atomically and without pickle.

A checkpoint `checkpoints/step-N/` holds everything that makes step N+1 of a resumed run identical to step N+1
of an uninterrupted one: model weights, AdamW moments, random-number-generator states and the counters. The
learning-rate schedule and the data order are pure functions of the step, so the step number restores them.
Tensors go to safetensors, everything else to JSON; the folder is built under a temporary name and renamed
into place, so a kill at any moment leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from distill.atomic import fresh_tmp_folder, replace_folder

_STEP_FOLDER = re.compile(r"^step-(\d+)$")


@dataclass
class RunState:
    """Counters carried across a resume."""

    step: int = 0
    tokens_seen: int = 0
    loss_tokens_seen: int = 0
    elapsed_s: float = 0.0
    last_eval: dict = field(default_factory=dict)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> Path:
    """Write checkpoints/step-N atomically and return its path."""
    final = Path(folder) / f"step-{state.step}"
    tmp = fresh_tmp_folder(final)
    # save_model (not save_file) because tied embeddings share storage, which save_file refuses.
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    meta = {"state": asdict(state), "optimizer": opt_meta, "rng": rng_meta}
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    replace_folder(tmp, final)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FOLDER.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> RunState:
    """Restore model, optimizer and RNG states in place; return the counters."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    del missing, unexpected  # strict=True already raised on either
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), meta["rng"])
    return RunState(**meta["state"])
