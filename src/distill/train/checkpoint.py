"""Resumable training state, written atomically and without pickle.

A checkpoint `checkpoints/step-N/` holds everything that makes step N+1 of a resumed run identical to step N+1
of an uninterrupted one: model weights, AdamW moments, random-number-generator states (one per rank) and the
counters. Weights and moments are whole tensors keyed by parameter name, whatever the number of processes and
however they were sharded, so a run can resume under another launch. The
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
from safetensors.torch import load_file, save_file

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
    # sha256 of the training examples' tokens: a training file rewritten in place (same path, same recipe)
    # would otherwise resume on other data. Empty in checkpoints written before it existed.
    data_fingerprint: str = ""


def _optimizer_tensors(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for name, param_state in optimizer_state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, field_name = key.rsplit("/", 1)
        state.setdefault(name, {})[field_name] = value
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _without_shared_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give the repeats their own copy."""
    seen: set[int] = set()
    out = {}
    for name, value in tensors.items():
        value = value.detach().contiguous().cpu()
        pointer = value.untyped_storage().data_ptr()
        out[name] = value.clone() if pointer in seen else value
        seen.add(pointer)
    return out


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random-number-generator states: (tensors, JSON-able rest)."""
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


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, as loaded: whole state dicts keyed by parameter name, one RNG state per rank."""

    model: dict[str, torch.Tensor]
    optimizer: dict
    rng: list[tuple[dict[str, torch.Tensor], dict]]
    state: RunState


def save_checkpoint(folder: Path, model_state: dict, optimizer_state: dict, rng_states: list, state: RunState) -> Path:
    """Write checkpoints/step-N atomically and return its path.

    `model_state` and `optimizer_state` are whole, name-keyed state dicts (`distill.train.parallel.full_state_dicts`),
    `rng_states` one `rng_state()` per rank.
    """
    final = Path(folder) / f"step-{state.step}"
    tmp = fresh_tmp_folder(final)
    save_file(_without_shared_storage(model_state), str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors = {f"{rank}.{name}": t for rank, (tensors, _) in enumerate(rng_states) for name, t in tensors.items()}
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    meta = {"state": asdict(state), "optimizer": opt_meta, "rng": [meta for _, meta in rng_states]}
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


def load_checkpoint(path: Path, tensors: bool = True) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`; tensors=False leaves model and optimizer empty
    (ranks other than 0 of a multi-process run: rank 0 broadcasts them)."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    rng_tensors = load_file(str(path / "rng.safetensors"))
    rng = []
    for rank, rng_meta in enumerate(meta["rng"]):
        prefix = f"{rank}."
        rng.append(({k[len(prefix) :]: v for k, v in rng_tensors.items() if k.startswith(prefix)}, rng_meta))
    return Checkpoint(
        model=load_file(str(path / "model.safetensors")) if tensors else {},
        optimizer=_optimizer_state(load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
        if tensors
        else {},
        rng=rng,
        state=RunState(**meta["state"]),
    )
