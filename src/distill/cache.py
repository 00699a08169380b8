"""Offline teacher signals: run the teacher once over the training set, store a few numbers per token, and
train any number of students from them without the teacher.

What is stored, per loss token (a position whose label counts; prompt and padding positions are skipped):

- ``top_k``   the teacher's k most probable ids and their log-probabilities at temperature 1, plus the log of
              the mass left over (`distill.sparse.SparseTargets`), so the tail is accounted for rather than
              dropped. Training divergences are those of `distill.sparse` on the (k+1)-bucket coarse
              distributions; at τ ≠ 1 the tail is assumed uniform over the other tokens.
- ``sampled`` m draws from the teacher's distribution (Sparse Logit Sampling, Anshumann et al. 2025,
              arXiv:2503.16870), kept as distinct ids with their counts and their log-probabilities. At τ = 1
              the weights count/m are an unbiased estimate of the full distribution, so the forward-KL
              gradient is unbiased. At τ ≠ 1 the weights are importance-reweighted, w ∝ count · p^(1/τ − 1),
              and self-normalized: consistent, not unbiased.

Folder layout::

    manifest.json                 written last: identities, settings, token counts, one sha256 per shard
    shard-00000.safetensors ...   ids (uint16 when the vocabulary has at most 65536 tokens, else uint32),
                                  log-probs (float32 / float16 / 8-bit codes), offsets of each example's rows

Shards hold consecutive examples of the trainer's own example list (`distill.train.load_data`, i.e. after
the held-out split) and end at example boundaries; row r of a shard belongs to a loss token of an example in
order, so an example's rows are `offsets[j]:offsets[j+1]` (random access for shuffled training, through
memory maps). With ``precision: int8`` each row stores its highest and lowest log-prob in float16 and 8-bit
codes uniformly between them.

Resumable: the plan (`build.json`: identities and shard boundaries) is written first, each shard is written
to a temporary name and renamed, the manifest last. A build killed at any moment restarts at the first
missing shard. Shards are a pure function of the plan: teacher in eval mode, fixed examples and batches per
shard, one seeded generator per shard for sampling; on the same machine and software a resumed build is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distill import atomic
from distill.data import Example, collate, pad_id_of
from distill.errors import DistillError
from distill.losses import IGNORE_INDEX
from distill.sparse import SparseTargets

FORMAT = "distill-cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "build.json"
_HASH_CHUNK = 1 << 20
_NEG_INF = float("-inf")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------- identities


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides token ids: the backend tokenizer's model/normalizer/pre-tokenizer, the special
    ids and the chat template. Padding and truncation settings (mutable at run time) are left out."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "size": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def teacher_hash(path: str, revision: str | None = None) -> str:
    """sha256 of a local teacher folder's config and weight files (names and bytes); for a hub id, of the id
    and revision only (the hub's own commit pins the rest)."""
    folder = Path(path)
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(f"hub:{path}@{revision}".encode())
        return h.hexdigest()
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and (p.name == "config.json" or p.suffix in {".safetensors", ".bin"} or p.name.endswith(".index.json"))
    )
    for file in files:
        h.update(file.name.encode() + b"\0" + _sha256_file(file).encode())
    return h.hexdigest()


def data_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the token ids and loss masks of `examples`, in order."""
    h = hashlib.sha256(str(len(examples)).encode())
    for e in examples:
        h.update(struct.pack("<q", len(e.input_ids)))
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(e.loss_mask, dtype=np.bool_).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- shard files


_NP_TO_ST = {"uint8": "U8", "uint16": "U16", "uint32": "U32", "int64": "I64", "float16": "F16", "float32": "F32"}
_ST_TO_NP = {v: k for k, v in _NP_TO_ST.items()}


def _encode_safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    """The safetensors byte layout, written here so it is canonical (sorted names, fixed header padding)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        blob = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _NP_TO_ST[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _open_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of a shard file (nothing is read until sliced)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + size
    arrays = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        dtype = np.dtype(_ST_TO_NP[spec["dtype"]]).newbyteorder("<")
        arrays[name] = raw[base + start : base + end].view(dtype).reshape(spec["shape"])
    return arrays


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- quantization


def _encode_log_probs(lp: torch.Tensor, used: torch.Tensor, precision: str) -> dict[str, np.ndarray]:
    """(n, s) float32 log-probs -> stored arrays. int8: codes 0..255 between each row's highest and lowest
    used log-prob (kept in float16), so the error is at most half a step of that row's own range."""
    if precision == "float32":
        return {"": lp.numpy().astype(np.float32)}
    if precision == "float16":
        return {"": lp.clamp_min(-65000.0).numpy().astype(np.float16)}
    finite = lp.clamp_min(-65000.0)  # (n, s) -inf (a masked teacher logit) becomes very unlikely, not NaN
    hi = torch.where(used, finite, -math.inf).amax(-1).half().float()  # (n,) rounded as stored
    lo = torch.where(used, finite, math.inf).amin(-1).half().float()  # (n,)
    hi = torch.where(torch.isfinite(hi), hi, 0.0)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    span = (hi - lo).clamp_min(1e-12).unsqueeze(-1)  # (n, 1)
    codes = ((hi.unsqueeze(-1) - finite) / span * 255.0).round().clamp(0, 255)  # (n, s)
    codes = torch.where(used, codes, 0.0)
    return {"": codes.numpy().astype(np.uint8), "_range": torch.stack([hi, lo], -1).numpy().astype(np.float16)}


def _decode_log_probs(arrays: dict[str, np.ndarray], key: str, rows: slice, precision: str) -> np.ndarray:
    stored = arrays[key][rows]
    if precision != "int8":
        return stored.astype(np.float32)
    bounds = arrays[key + "_range"][rows].astype(np.float32)  # (n, 2): highest, lowest
    hi, lo = bounds[:, :1], bounds[:, 1:]
    return hi + stored.astype(np.float32) / np.float32(255.0) * (lo - hi)


def bytes_per_token(representation: str, k: int, m: int, precision: str, vocab_size: int) -> dict[str, int]:
    """Stored bytes per loss token of each representation (offsets and headers excluded)."""
    id_bytes = 2 if vocab_size <= 65536 else 4
    lp_bytes = {"float32": 4, "float16": 2, "int8": 1}[precision]
    rest_bytes = 4 if precision == "float32" else 2
    extra = 4 if precision == "int8" else 0  # the per-row float16 range of the codes
    out = {}
    if representation in ("top_k", "both"):
        out["top_k"] = k * (id_bytes + lp_bytes) + rest_bytes + extra
    if representation in ("sampled", "both"):
        out["sampled"] = m * (id_bytes + 1 + lp_bytes) + extra
    return out


# ---------------------------------------------------------------- building


def _plan_shards(examples: Sequence[Example], shard_tokens: int) -> list[dict]:
    shards, first, tokens = [], 0, 0
    for i, e in enumerate(examples):
        tokens += e.loss_tokens
        if tokens >= shard_tokens or i == len(examples) - 1:
            shards.append(
                {"file": shard_name(len(shards)), "first_example": first, "examples": i + 1 - first, "tokens": tokens}
            )
            first, tokens = i + 1, 0
    return shards


def _build_plan(recipe, tokenizer, examples: Sequence[Example], vocab_size: int) -> dict:
    t, d, c = recipe.teacher, recipe.data, recipe.cache
    stores_top_k = c.representation in ("top_k", "both")
    stores_sampled = c.representation in ("sampled", "both")
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"path": t.path, "revision": t.revision, "dtype": t.dtype, "hash": teacher_hash(t.path, t.revision)},
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "data": {
            "train": d.train,
            "eval": d.eval,
            "max_length": d.max_length,
            "packing": d.packing,
            "fingerprint": data_fingerprint(examples),
            "examples": len(examples),
            "loss_tokens": sum(e.loss_tokens for e in examples),
        },
        "vocab_size": vocab_size,
        "id_dtype": "uint16" if vocab_size <= 65536 else "uint32",
        "representation": c.representation,
        "top_k": min(c.top_k, vocab_size) if stores_top_k else None,
        "sample_m": c.sample_m if stores_sampled else None,
        "precision": c.precision,
        "seed": recipe.training.seed,
        "teacher_batch_size": c.batch_size,
        "positions": "loss tokens only (labels != -100), in example order",
        "shards": _plan_shards(examples, c.shard_tokens),
    }


def _first_difference(before: dict, now: dict) -> str | None:
    """The recipe key (or identity) that makes an existing plan or manifest `before` differ from `now`."""
    planned = ("file", "first_example", "examples", "tokens")
    before = {**before, "shards": [{k: s.get(k) for k in planned} for s in before.get("shards", [])]}
    for key in ("format", "version", "teacher", "tokenizer_hash", "data", "vocab_size", "shards"):
        if before.get(key) != now.get(key):
            return {"tokenizer_hash": "tokenizer", "shards": "cache.shard_tokens"}.get(key, key)
    for key in ("representation", "top_k", "sample_m", "precision", "seed", "teacher_batch_size"):
        if before.get(key) != now.get(key):
            return {"seed": "training.seed", "teacher_batch_size": "cache.batch_size"}.get(key, f"cache.{key}")
    return None


@torch.no_grad()
def _shard_arrays(teacher, examples: Sequence[Example], plan: dict, index: int, pad_id: int, device) -> dict:
    """Every stored array of shard `index`: a pure function of the plan and the teacher."""
    shard = plan["shards"][index]
    chosen = examples[shard["first_example"] : shard["first_example"] + shard["examples"]]
    vocab, k, m, precision = plan["vocab_size"], plan["top_k"], plan["sample_m"], plan["precision"]
    id_dtype = np.dtype(plan["id_dtype"])
    generator = torch.Generator().manual_seed(plan["seed"] * 1_000_003 + index)  # one stream per shard
    parts: dict[str, list[torch.Tensor]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.cpu())

    for start in range(0, len(chosen), plan["teacher_batch_size"]):
        batch = collate(chosen[start : start + plan["teacher_batch_size"]], pad_id)
        logits = teacher(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[:, :-1, :vocab]  # (B, T-1, V)
        counted = (batch["labels"] != IGNORE_INDEX).to(device)  # (B, T-1)
        lp = torch.log_softmax(logits[counted].float(), dim=-1).cpu()  # (n, V) rows in example, position order
        if k is not None:
            top_lp, top_ids = lp.topk(k, dim=-1)  # (n, k), (n, k)
            add("ids", top_ids)
            add("log_probs", top_lp)
            add("log_rest", lp.scatter(-1, top_ids, _NEG_INF).logsumexp(-1))  # (n,) no 1 − Σp cancellation
        if m is not None:
            draws = torch.multinomial(lp.exp(), m, replacement=True, generator=generator)  # (n, m)
            counts = torch.zeros_like(lp).scatter_add_(-1, draws, torch.ones(draws.shape))  # (n, V)
            count, ids = counts.topk(m, dim=-1)  # (n, m) the distinct drawn ids come first
            key = torch.where(count > 0, ids, vocab)  # canonical order: by id, unused slots last
            order = key.argsort(dim=-1, stable=True)
            ids, count = ids.gather(-1, order), count.gather(-1, order)
            ids = torch.where(count > 0, ids, 0)
            add("sample_ids", ids)
            add("sample_counts", count)
            add("sample_log_probs", torch.where(count > 0, lp.gather(-1, ids), 0.0))

    joined = {name: torch.cat(values) for name, values in parts.items()}
    arrays: dict[str, np.ndarray] = {}
    if k is not None:
        arrays["ids"] = joined["ids"].numpy().astype(id_dtype)
        for suffix, a in _encode_log_probs(
            joined["log_probs"], torch.ones_like(joined["ids"], dtype=torch.bool), precision
        ).items():
            arrays["log_probs" + suffix] = a
        rest = joined["log_rest"].numpy()
        arrays["log_rest"] = rest.astype(np.float32 if precision == "float32" else np.float16)
    if m is not None:
        arrays["sample_ids"] = joined["sample_ids"].numpy().astype(id_dtype)
        arrays["sample_counts"] = joined["sample_counts"].numpy().astype(np.uint8)
        used = joined["sample_counts"] > 0
        for suffix, a in _encode_log_probs(joined["sample_log_probs"], used, precision).items():
            arrays["sample_log_probs" + suffix] = a
    sizes = [e.loss_tokens for e in chosen]
    arrays["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (examples + 1,)
    rows = next(iter(joined.values())).shape[0]
    if rows != shard["tokens"] or arrays["offsets"][-1] != rows:
        raise DistillError(f"internal error: shard {shard['file']} has {rows} rows, expected {shard['tokens']}")
    return arrays


def _pick_device(recipe) -> torch.device:
    if recipe.training.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_cache(recipe, log: Callable[[str], None] = print, show_progress: bool = True) -> Path:
    """Run `distill cache`: write (or finish) the folder `recipe.cache.dir` and return it.

    Restarting after a kill continues at the first missing shard; a finished cache with the same plan is left
    as it is. A folder holding a different cache (other teacher, data, tokenizer or settings) is an error.
    """
    from distill.models import check_vocabulary, load_model, load_tokenizer, resolve_dtype
    from distill.train import load_data

    t, c = recipe.teacher, recipe.cache
    if t.path is None:
        raise DistillError("recipe key teacher.path: `distill cache` runs the teacher, so it needs teacher.path")
    if recipe.data.train is None:
        raise DistillError("recipe key data.train: no training data given")
    tokenizer_source = recipe.student.tokenizer or t.path  # the tokenizer `distill train` will use
    tokenizer = load_tokenizer(tokenizer_source, "teacher", t.trust_remote_code, t.revision)
    examples, _ = load_data(recipe, tokenizer, log)
    vocab_size = len(tokenizer)
    plan = _build_plan(recipe, tokenizer, examples, vocab_size)

    root = Path(c.dir)
    root.mkdir(parents=True, exist_ok=True)
    for path, what in ((root / MANIFEST, "a finished"), (root / PLAN, "an unfinished")):
        if path.exists():
            before = json.loads(path.read_text(encoding="utf-8"))
            difference = _first_difference(before, plan)
            if difference is not None:
                raise DistillError(
                    f"cache.dir {root} holds {what} cache built with a different {difference}; "
                    "choose another cache.dir or delete that folder"
                )
            if what == "a finished":
                log(f"cache {root} is already complete ({plan['data']['loss_tokens']} tokens)")
                return root
    if not (root / PLAN).exists():
        atomic.write_json(root / PLAN, plan)
    for leftover in root.glob(".*.tmp-*"):  # a killed run's half-written shard
        leftover.unlink(missing_ok=True)

    missing = [i for i, s in enumerate(plan["shards"]) if not (root / s["file"]).exists()]
    done = len(plan["shards"]) - len(missing)
    if missing:
        device = _pick_device(recipe)
        teacher = load_model(t.path, "teacher", resolve_dtype(t.dtype, device), t.trust_remote_code, t.revision)
        teacher.eval().requires_grad_(False).to(device)
        check_vocabulary(tokenizer, teacher, None)
        log(
            f"cache: {len(examples)} examples, {plan['data']['loss_tokens']} loss tokens, {len(plan['shards'])} shards"
            + (f" ({done} already written)" if done else "")
        )
        pad_id = pad_id_of(tokenizer)
        for i in missing:
            arrays = _shard_arrays(teacher, examples, plan, i, pad_id, device)
            _write_bytes_atomic(root / plan["shards"][i]["file"], _encode_safetensors(arrays))
            done += 1
            if show_progress:
                log(f"cache: shard {done}/{len(plan['shards'])} written")

    manifest = dict(plan)
    manifest["shards"] = [
        {**s, "bytes": (root / s["file"]).stat().st_size, "sha256": _sha256_file(root / s["file"])}
        for s in plan["shards"]
    ]
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    manifest["bytes"] = total_bytes
    manifest["bytes_per_token"] = {
        **bytes_per_token(c.representation, c.top_k, c.sample_m, c.precision, vocab_size),
        "files": total_bytes / max(1, plan["data"]["loss_tokens"]),
    }
    atomic.write_json(root / MANIFEST, manifest)
    (root / PLAN).unlink(missing_ok=True)
    per_token = manifest["bytes_per_token"]["files"]
    log(f"cache written to {root}: {total_bytes / 2**20:.1f} MiB, {per_token:.1f} bytes per loss token")
    return root


# ---------------------------------------------------------------- checking


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (an unfinished build: run `distill cache` again to finish it)" if (root / PLAN).exists() else ""
        raise DistillError(f"teacher cache {root}: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DistillError(f"teacher cache {root}: cannot read {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DistillError(f"teacher cache {root}: not a {FORMAT} v{VERSION} folder")
    return manifest


def verify_cache(root: str | Path, raise_on_problem: bool = True) -> list[str]:
    """Check every shard's size and sha256 against the manifest (`distill cache verify DIR`).

    Returns the problems found, one line each naming the shard (empty when the cache is sound); with
    `raise_on_problem` a DistillError naming the first bad shard is raised instead.
    """
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            problems.append(f"shard {shard['file']} is missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"shard {shard['file']} is corrupt (size {path.stat().st_size}, expected {shard['bytes']})")
        elif _sha256_file(path) != shard["sha256"]:
            problems.append(f"shard {shard['file']} is corrupt (checksum mismatch)")
    if problems and raise_on_problem:
        more = f" (and {len(problems) - 1} more bad shards)" if len(problems) > 1 else ""
        raise DistillError(f"teacher cache {root}: {problems[0]}{more}")
    return problems


# ---------------------------------------------------------------- reading for training


def sampled_targets(
    ids: torch.Tensor, counts: torch.Tensor, log_probs: torch.Tensor, temperature: float
) -> SparseTargets:
    """Sampled draws -> `SparseTargets` whose coarse distribution at `temperature` is the sample estimate.

    ids, counts, log_probs (n, m): distinct drawn ids, how often each was drawn (0 = unused slot) and the
    teacher's log-probability at τ = 1. The estimate at τ is w ∝ count · p^(1/τ − 1) (self-normalized
    importance weights; count/m at τ = 1). `distill.sparse` divides stored log-probs by τ, so τ·log w is
    stored, and the rest mass is empty: the estimate sums to one by construction.
    """
    used = counts > 0  # (n, m)
    log_w = counts.float().log() + (1.0 / temperature - 1.0) * log_probs.float()  # (n, m)
    log_w = torch.where(used, log_w, _NEG_INF)
    log_w = log_w - log_w.logsumexp(-1, keepdim=True)
    log_w = torch.where(used, log_w * temperature, _NEG_INF)
    ids = torch.where(used, ids.long(), -1)
    return SparseTargets(ids, log_w, torch.full(ids.shape[:1], _NEG_INF))


class CacheReader:
    """Random access to a finished cache by example index, for the training loop."""

    def __init__(
        self, root: Path, manifest: dict, examples: Sequence[Example], representation: str, temperature: float
    ):
        self.root, self.manifest, self.examples = root, manifest, examples
        self.representation, self.temperature = representation, temperature
        self._firsts = np.array([s["first_example"] for s in manifest["shards"]], dtype=np.int64)
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self.width = manifest["top_k"] if representation == "top_k" else manifest["sample_m"]

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._open:
            self._open[index] = _open_safetensors(self.root / self.manifest["shards"][index]["file"])
        return self._open[index]

    def _rows(self, example: int) -> dict[str, np.ndarray]:
        """The stored arrays of one example's loss tokens, in position order (log-probs decoded to float32)."""
        s = int(np.searchsorted(self._firsts, example, side="right")) - 1
        arrays = self._shard(s)
        j = example - self.manifest["shards"][s]["first_example"]
        rows = slice(int(arrays["offsets"][j]), int(arrays["offsets"][j + 1]))
        precision = self.manifest["precision"]
        if self.representation == "top_k":
            return {
                "ids": arrays["ids"][rows],
                "log_probs": _decode_log_probs(arrays, "log_probs", rows, precision),
                "log_rest": arrays["log_rest"][rows],
            }
        return {
            "ids": arrays["sample_ids"][rows],
            "counts": arrays["sample_counts"][rows],
            "log_probs": _decode_log_probs(arrays, "sample_log_probs", rows, precision),
        }

    def _to_targets(self, rows: dict[str, np.ndarray]) -> SparseTargets:
        ids = torch.from_numpy(rows["ids"].astype(np.int64))
        lp = torch.from_numpy(rows["log_probs"])
        if self.representation == "top_k":
            return SparseTargets(ids, lp, torch.from_numpy(rows["log_rest"].astype(np.float32)))
        return sampled_targets(ids, torch.from_numpy(rows["counts"].astype(np.int64)), lp, self.temperature)

    def example_targets(self, example: int) -> SparseTargets:
        """The stored targets of one example's loss tokens, in position order."""
        return self._to_targets(self._rows(example))

    def targets(self, example_indices: Sequence[int] | torch.Tensor, width: int, device=None) -> SparseTargets:
        """Targets for a batch laid out as its (B, width) label grid, flattened: (B·width) rows.

        Rows of positions that do not count hold no information (all mass in the tail); the losses skip them.
        """
        indices = example_indices.tolist() if isinstance(example_indices, torch.Tensor) else list(example_indices)
        parts, positions = [], []
        for row, example in enumerate(indices):
            mask = np.asarray(self.examples[example].loss_mask[1 : width + 1], dtype=np.bool_)
            part = self._rows(example)
            if len(part["ids"]) != int(mask.sum()):
                raise DistillError(
                    f"teacher cache {self.root}: example {example} has {len(part['ids'])} stored tokens, "
                    f"the batch {int(mask.sum())} (the cache does not match this data)"
                )
            parts.append(part)
            positions.append(np.flatnonzero(mask) + row * width)
        stored = self._to_targets({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})  # (M, s)
        where = torch.from_numpy(np.concatenate(positions))  # (M,) flat positions in the (B, width) grid
        n = len(indices) * width
        ids = torch.full((n, self.width), -1, dtype=torch.long).index_copy_(0, where, stored.ids)  # (B·width, s)
        lp = torch.full((n, self.width), _NEG_INF).index_copy_(0, where, stored.log_probs)  # (B·width, s)
        rest = torch.zeros(n).index_copy_(0, where, stored.log_rest)  # (B·width,)
        targets = SparseTargets(ids, lp, rest)
        return targets.to(device) if device is not None else targets


def open_cache_for_training(
    recipe, tokenizer, examples: Sequence[Example], vocab_size: int | None = None
) -> CacheReader:
    """Check that `recipe.teacher.cache` (default: cache.dir) was built for this tokenizer, these training
    examples (and, when teacher.path is given, this teacher), then open it. Raises DistillError saying which
    one differs."""
    root = Path(recipe.teacher.cache or recipe.cache.dir)
    manifest = read_manifest(root)
    where = f"teacher.cache {root}"
    if manifest["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise DistillError(f"{where}: built with a different tokenizer than the recipe's (token ids would not match)")
    fingerprint = data_fingerprint(examples)
    if manifest["data"]["fingerprint"] != fingerprint:
        cached = manifest["data"]
        raise DistillError(
            f"{where}: built from different training data than the recipe's data.train "
            f"({cached['examples']} examples / {cached['loss_tokens']} loss tokens in the cache, "
            f"{len(examples)} / {sum(e.loss_tokens for e in examples)} now; check data.train, data.max_length, "
            "data.packing, data.eval and training.seed)"
        )
    t = recipe.teacher
    if t.path is not None and manifest["teacher"]["hash"] != teacher_hash(t.path, t.revision):
        raise DistillError(f"{where}: built with a different teacher than teacher.path {t.path}")
    if vocab_size is not None and manifest["vocab_size"] != vocab_size:
        raise DistillError(
            f"{where}: built for a vocabulary of {manifest['vocab_size']} tokens, training uses {vocab_size}"
        )
    stored = manifest["representation"]
    choice = recipe.cache.train_on
    if choice == "auto":
        choice = "top_k" if stored in ("top_k", "both") else "sampled"
    if stored not in (choice, "both"):
        raise DistillError(f"recipe key cache.train_on: the cache at {root} stores {stored}, not {choice}")
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise DistillError(f"{where}: shard {shard['file']} is missing or truncated (run `distill cache verify`)")
    return CacheReader(root, manifest, examples, choice, recipe.objective.temperature)
