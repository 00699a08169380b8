"""Offline teacher signals: run the teacher once over the training set, store a few numbers per token, and
train any number of students from them without the teacher.

What is stored, per loss token (a position whose label counts; prompt and padding positions are skipped):

- ``top_k``   the teacher's k most probable ids and their log-probabilities at temperature 1, the log of the
              mass left over, and log Σ √p over the rest (`distill.losses.sparse.SparseTargets`): the tail is
              accounted for rather than dropped, and its tempered mass is known at τ = 2 (interpolated at
              other τ). Training divergences are those of `distill.losses.sparse`, with the rest as one extra class
              (``cache.tail: bucket``) or spread evenly over the other tokens (``uniform``).
- ``sampled`` m draws from the teacher's distribution (Sparse Logit Sampling, Anshumann et al. 2025,
              arXiv:2503.16870), kept as distinct ids with their counts and their log-probabilities. At τ = 1
              the weights count/m are an unbiased estimate of the full distribution, so the forward-KL
              gradient is unbiased. At τ ≠ 1 the weights are importance-reweighted, w ∝ count · p^(1/τ − 1),
              and self-normalized: consistent, not unbiased.

Folder layout::

    manifest.json                 written last: identities, settings, token counts, one sha256 per shard and
                                  per tokenizer file, the teacher files' (size, mtime, sha256)
    shard-00000.safetensors ...   ids (uint16 when the vocabulary has at most 65536 tokens, else uint32; or,
                                  with cache.pack_ids, ceil(log2 V) bits each in uint8 rows), log-probs
                                  (float32 / float16 / 8- or 4-bit codes), offsets of each example's rows
    tokenizer/                    the tokenizer's files, for recipes that name no other tokenizer

Shards hold consecutive examples of the trainer's own example list (`distill.train.loop.load_data`, i.e. after
the held-out split) and end at example boundaries; row r of a shard belongs to a loss token of an example in
order, so an example's rows are `offsets[j]:offsets[j+1]` (random access for shuffled training, through
memory maps). With ``precision: int8`` / ``int4`` each row stores its highest and lowest log-prob in float16
and 8-bit / 4-bit codes uniformly between them (int4 codes two per byte).

Built from a `distill generate` file instead (``cache.source: generated``): the top-k log-probs the file stores
per completion token become the cached top-k (k = the number stored, at most cache.top_k), the rest is
log(1 − Σ exp(top-k)) clamped at 1e-6, and no teacher is loaded or run. The teacher is then known by the file's
sha256 (and teacher.path's hash when the recipe names one). Rows are tokenized as `distill.data` does (their
prompt_ids + completion_ids when present); every loss token of a training example must be a completion token
with stored log-probs, and a row where that fails (no top_logprobs, ids that do not line up, an EOS the loader
adds) stops the build with one line naming it: made-up targets would be worse than none. log Σ √p of the tail is
unknown, so training at τ ≠ 1 assumes a flat tail (`distill.losses.sparse`).

Resumable: the plan (`build.json`: identities and shard boundaries) is written first, each shard is written
to a temporary name and renamed, the manifest last. A build killed at any moment restarts at the first
missing shard. Shards are a pure function of the plan: teacher in eval mode, fixed examples and batches per
shard, one seeded generator per shard for sampling; on the same machine and software a resumed build is
byte-identical to an uninterrupted one. Under `torchrun` / `accelerate launch` the missing shards are dealt
out over the ranks, and the folder ends identical to a one-process build.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distill import atomic
from distill.data import Example, collate, data_fingerprint, forward_inputs, pad_id_of
from distill.errors import DistillError
from distill.losses.dense import IGNORE_INDEX
from distill.losses.sparse import SparseTargets, tail_half_mass

FORMAT = "distill-cache"
VERSION = 2  # 2: optional bit-packed ids, int4, the tokenizer folder, teacher file records
READABLE_VERSIONS = (1, 2)
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


def teacher_files(path: str, known: dict | None = None) -> dict[str, dict]:
    """{file name: {bytes, mtime_ns, sha256}} of a local teacher folder's config and weight files ({} for a hub id).

    `known` is an earlier result for the same folder: a file whose size and modification time (in ns) are both
    unchanged keeps its recorded sha256 instead of being read again, the same trust that make and rsync place
    in (size, mtime). Anything else is hashed.
    """
    folder = Path(path)
    if not folder.is_dir():
        return {}
    known = known or {}
    files = {}
    for file in sorted(folder.iterdir()):
        if not file.is_file() or not (
            file.name == "config.json" or file.suffix in {".safetensors", ".bin"} or file.name.endswith(".index.json")
        ):
            continue
        stat = file.stat()
        before = known.get(file.name, {})
        same = before.get("bytes") == stat.st_size and before.get("mtime_ns") == stat.st_mtime_ns
        digest = before["sha256"] if same and "sha256" in before else _sha256_file(file)
        files[file.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return files


def teacher_hash(path: str, revision: str | None = None, files: dict[str, dict] | None = None) -> str:
    """sha256 of a local teacher folder's config and weight files (names and contents; `files` as given by
    `teacher_files`, computed when omitted); for a hub id, of the id and revision only (the hub's own commit
    pins the rest)."""
    h = hashlib.sha256()
    if not Path(path).is_dir():
        h.update(f"hub:{path}@{revision}".encode())
        return h.hexdigest()
    files = teacher_files(path) if files is None else files
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name]["sha256"].encode())
    return h.hexdigest()


def _known_teacher_files(manifest: dict, path: str) -> dict | None:
    """The file records an earlier build kept for the same teacher folder, if any."""
    t = manifest.get("teacher", {})
    if t.get("path") is None or os.path.abspath(t["path"]) != os.path.abspath(path):
        return None
    return t.get("files")


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


# ---------------------------------------------------------------- quantization and bit packing

_LEVELS = {"int8": 255, "int4": 15}  # highest code of each quantized precision
# cache.tail_samples when the recipe leaves it out: with top-32, int4 and packed ids the best measured representation.
DEFAULT_TAIL_SAMPLES = 8
_PACK_ROWS = 1 << 14  # rows packed at a time: bounds the (rows, s, bits) scratch array


def id_bits(vocab_size: int) -> int:
    """Bits per bit-packed id: ceil(log2 V)."""
    return max(1, (vocab_size - 1).bit_length())


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(n, s) unsigned ints below 2**bits -> (n, ceil(s·bits / 8)) uint8; each row packed on its own (low bit
    first), so any row can be read without the others."""
    n, s = values.shape
    out = np.empty((n, -(-s * bits // 8)), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint32)
    for start in range(0, n, _PACK_ROWS):
        block = values[start : start + _PACK_ROWS].astype(np.uint32)  # (b, s)
        flat = ((block[..., None] >> shifts) & 1).astype(np.uint8).reshape(len(block), s * bits)  # (b, s·bits)
        out[start : start + len(block)] = np.packbits(flat, axis=-1, bitorder="little")
    return out


def _unpack_bits(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Inverse of `_pack_bits`: (n, bytes) uint8 -> (n, width) int64.

    Read per batch during training, so it works on whole bytes rather than on single bits: value i starts at
    bit i·bits, i.e. at bit (i·bits mod 8) of byte ⌊i·bits / 8⌋, and spans at most ⌈(bits + 7) / 8⌉ bytes; those
    bytes are gathered for all values at once, combined little-endian into a uint64 (bits ≤ 32 keeps the shifted
    value within 64 bits), shifted and masked. int4 codes (two per byte) are the low and high nibbles.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    n = len(packed)
    if bits == 4:
        nibbles = np.empty((n, packed.shape[1], 2), dtype=np.uint8)
        np.bitwise_and(packed, 15, out=nibbles[..., 0])
        np.right_shift(packed, 4, out=nibbles[..., 1])
        return nibbles.reshape(n, -1)[:, :width].astype(np.int64)
    if bits > 32:
        raise ValueError(f"ids of {bits} bits are not supported")
    start = np.arange(width, dtype=np.int64) * bits  # (width,) first bit of each value
    first_byte, shift = start // 8, (start % 8).astype(np.uint64)
    spans = (bits + 7 + 7) // 8  # bytes a value may touch, starting mid-byte
    padded = np.zeros((n, packed.shape[1] + spans), dtype=np.uint8)  # reading past the row's end sees zeros
    padded[:, : packed.shape[1]] = packed
    value = np.zeros((n, width), dtype=np.uint64)
    for b in range(spans):
        value |= padded[:, first_byte + b].astype(np.uint64) << np.uint64(8 * b)
    return ((value >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)


def _encode_log_probs(lp: torch.Tensor, used: torch.Tensor, precision: str) -> dict[str, np.ndarray]:
    """(n, s) float32 log-probs -> stored arrays. int8 / int4: codes 0..255 / 0..15 between each row's highest
    and lowest used log-prob (kept in float16), so the error is at most half a step of that row's own range;
    int4 codes are packed two per byte."""
    if precision == "float32":
        return {"": lp.numpy().astype(np.float32)}
    if precision == "float16":
        return {"": lp.clamp_min(-65000.0).numpy().astype(np.float16)}
    levels = _LEVELS[precision]
    finite = lp.clamp_min(-65000.0)  # (n, s) -inf (a masked teacher logit) becomes very unlikely, not NaN
    hi = torch.where(used, finite, -math.inf).amax(-1).half().float()  # (n,) rounded as stored
    lo = torch.where(used, finite, math.inf).amin(-1).half().float()  # (n,)
    hi = torch.where(torch.isfinite(hi), hi, 0.0)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    span = (hi - lo).clamp_min(1e-12).unsqueeze(-1)  # (n, 1)
    codes = ((hi.unsqueeze(-1) - finite) / span * levels).round().clamp(0, levels)  # (n, s)
    codes = torch.where(used, codes, 0.0).numpy().astype(np.uint8)
    if precision == "int4":
        codes = _pack_bits(codes, 4)
    return {"": codes, "_range": torch.stack([hi, lo], -1).numpy().astype(np.float16)}


def _decode_log_probs(arrays: dict[str, np.ndarray], key: str, rows: slice, precision: str, width: int) -> np.ndarray:
    stored = arrays[key][rows]
    if precision not in _LEVELS:
        return stored.astype(np.float32)
    if precision == "int4":
        stored = _unpack_bits(stored, 4, width)
    bounds = arrays[key + "_range"][rows].astype(np.float32)  # (n, 2): highest, lowest
    hi, lo = bounds[:, :1], bounds[:, 1:]
    return hi + stored.astype(np.float32) / np.float32(_LEVELS[precision]) * (lo - hi)


def bytes_per_token(
    representation: str,
    k: int,
    m: int,
    precision: str,
    vocab_size: int,
    pack_ids: bool = False,
    tail_m: int = 0,
    rest_half: bool = True,
) -> dict[str, int]:
    """Stored bytes per loss token of each representation (offsets and headers excluded)."""

    def ids(width: int) -> int:
        if pack_ids:
            return -(-width * id_bits(vocab_size) // 8)
        return width * (2 if vocab_size <= 65536 else 4)

    def log_probs(width: int) -> int:
        return {"float32": 4 * width, "float16": 2 * width, "int8": width, "int4": -(-width // 2)}[precision]

    rest_bytes = 4 if precision == "float32" else 2
    extra = 4 if precision in _LEVELS else 0  # the per-row float16 range of the codes
    out = {}
    if representation in ("top_k", "both"):
        out["top_k"] = ids(k) + log_probs(k) + (2 if rest_half else 1) * rest_bytes + extra  # rest mass, its √p sum
        if tail_m:
            out["top_k"] += ids(tail_m) + tail_m + log_probs(tail_m) + extra  # tail draws: ids, counts, log-probs
    if representation in ("sampled", "both"):
        out["sampled"] = ids(m) + m + log_probs(m) + extra  # + one uint8 count per draw
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


def _build_plan(
    recipe,
    tokenizer,
    examples: Sequence[Example],
    vocab_size: int,
    known_files: dict | None = None,
    generated: dict | None = None,
) -> dict:
    """The build's plan. `generated` ({"file", "sha256", "stored_top_k"}) for cache.source=generated: the
    teacher is then known by that file, and by teacher.path's hash only when the recipe names one."""
    t, d, c = recipe.teacher, recipe.data, recipe.cache
    files = teacher_files(t.path, known_files) if t.path is not None else {}
    stores_top_k = c.representation in ("top_k", "both")
    stores_sampled = c.representation in ("sampled", "both")
    teacher = {
        "path": t.path,
        "revision": t.revision,
        "dtype": t.dtype,
        "hash": teacher_hash(t.path, t.revision, files) if t.path is not None else None,
        "files": files,  # sizes and mtimes let a later run skip re-hashing unchanged weights
    }
    top_k = min(c.top_k, vocab_size) if stores_top_k else None
    tail_samples = c.tail_samples if c.tail_samples is not None else DEFAULT_TAIL_SAMPLES
    if generated is not None or top_k is None or top_k >= vocab_size:
        tail_samples = c.tail_samples or 0  # no tail to draw from
    arrays = ["ids", "log_probs", "log_rest", "log_rest_half"] if stores_top_k else None
    if generated is not None:
        # The log-probs come from the file; the teacher's dtype played no part here (it did when generating).
        teacher.update(dtype=None, model_name=t.model_name, generated=generated)
        top_k = min(c.top_k, generated["stored_top_k"])
        arrays = ["ids", "log_probs", "log_rest"]  # log Σ √p of the tail needs the full distribution
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": c.source,
        "teacher": teacher,
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
        "id_bits": id_bits(vocab_size) if c.pack_ids else None,
        "representation": c.representation,
        "top_k": top_k,
        "top_k_arrays": arrays,
        "tail_samples": tail_samples if stores_top_k and tail_samples else None,
        "sample_m": c.sample_m if stores_sampled else None,
        "precision": c.precision,
        "seed": recipe.training.seed if generated is None else None,  # nothing is drawn from a generated file
        "teacher_batch_size": c.batch_size if generated is None else None,
        "positions": "loss tokens only (labels != -100), in example order",
        "shards": _plan_shards(examples, c.shard_tokens),
    }


def _first_difference(before: dict, now: dict) -> str | None:
    """The recipe key (or identity) that makes an existing plan or manifest `before` differ from `now`."""
    planned = ("file", "first_example", "examples", "tokens")
    before = {**before, "shards": [{k: s.get(k) for k in planned} for s in before.get("shards", [])]}
    # The teacher by content: its files' recorded mtimes may change (a copy, a touch) without changing it.
    before["teacher"] = {k: v for k, v in before.get("teacher", {}).items() if k != "files"}
    now = {**now, "teacher": {k: v for k, v in now.get("teacher", {}).items() if k != "files"}}
    if before.get("source", "teacher") != now.get("source", "teacher"):
        return "cache.source"
    if before["teacher"].get("generated") != now["teacher"].get("generated"):
        return "generated file (data.train's content or its top_logprobs)"
    for key in ("format", "version", "teacher", "tokenizer_hash", "data", "vocab_size", "shards"):
        if before.get(key) != now.get(key):
            return {"tokenizer_hash": "tokenizer", "shards": "cache.shard_tokens"}.get(key, key)
    for key in ("representation", "top_k", "top_k_arrays", "tail_samples", "sample_m", "precision", "id_bits", "seed"):
        if before.get(key) != now.get(key):
            names = {"seed": "training.seed", "id_bits": "cache.pack_ids", "top_k_arrays": "format"}
            return names.get(key, f"cache.{key}")
    if before.get("teacher_batch_size") != now.get("teacher_batch_size"):
        return "cache.batch_size"
    return None


def _draw(lp: torch.Tensor, m: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """m draws with replacement from each row's distribution exp(lp) (unnormalized is fine), as (n, m) distinct
    ids sorted by id and their (n, m) counts; unused slots last, with id 0 and count 0."""
    weights = lp.exp()  # (n, V)
    empty = weights.sum(-1, keepdim=True) == 0  # (n, 1) a tail without mass: draw anything, count nothing
    draws = torch.multinomial(torch.where(empty, 1.0, weights), m, replacement=True, generator=generator)  # (n, m)
    counts = torch.zeros_like(lp).scatter_add_(-1, draws, torch.where(empty, 0.0, torch.ones(draws.shape)))
    count, ids = counts.topk(m, dim=-1)  # (n, m) the distinct drawn ids come first
    key = torch.where(count > 0, ids, vocab)  # canonical order: by id, unused slots last
    order = key.argsort(dim=-1, stable=True)
    ids, count = ids.gather(-1, order), count.gather(-1, order)
    return torch.where(count > 0, ids, 0), count


@torch.no_grad()
def _shard_arrays(teacher, examples: Sequence[Example], plan: dict, index: int, pad_id: int, device) -> dict:
    """Every stored array of shard `index`: a pure function of the plan and the teacher."""
    shard = plan["shards"][index]
    chosen = examples[shard["first_example"] : shard["first_example"] + shard["examples"]]
    vocab, k, m, precision = plan["vocab_size"], plan["top_k"], plan["sample_m"], plan["precision"]
    m_tail = plan.get("tail_samples")
    id_dtype, bits = np.dtype(plan["id_dtype"]), plan.get("id_bits")
    generator = torch.Generator().manual_seed(plan["seed"] * 1_000_003 + index)  # one stream per shard
    parts: dict[str, list[torch.Tensor]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.cpu())

    for start in range(0, len(chosen), plan["teacher_batch_size"]):
        batch = collate(chosen[start : start + plan["teacher_batch_size"]], pad_id)
        logits = teacher(**forward_inputs(batch, device)).logits[:, :-1, :vocab]  # (B, T-1, V)
        counted = (batch["labels"] != IGNORE_INDEX).to(device)  # (B, T-1)
        lp = torch.log_softmax(logits[counted].float(), dim=-1).cpu()  # (n, V) rows in example, position order
        if k is not None:
            top_lp, top_ids = lp.topk(k, dim=-1)  # (n, k), (n, k)
            add("ids", top_ids)
            add("log_probs", top_lp)
            tail = lp.scatter(-1, top_ids, _NEG_INF)  # (n, V) the others' log-probs
            add("log_rest", tail.logsumexp(-1))  # (n,) no 1 − Σp cancellation
            add("log_rest_half", tail_half_mass(tail))  # (n,) log Σ √p: the tail's mass at τ = 2
            if m_tail:
                # Draws from the tail alone (p restricted to the others, renormalized): what top-k cannot say.
                ids, count = _draw(tail, m_tail, vocab, generator)
                add("tail_ids", ids)
                add("tail_counts", count)
                add("tail_log_probs", torch.where(count > 0, lp.gather(-1, ids), 0.0))
        if m is not None:
            ids, count = _draw(lp, m, vocab, generator)
            add("sample_ids", ids)
            add("sample_counts", count)
            add("sample_log_probs", torch.where(count > 0, lp.gather(-1, ids), 0.0))

    joined = {name: torch.cat(values) for name, values in parts.items()}
    arrays: dict[str, np.ndarray] = {}

    def store_ids(name: str, ids: torch.Tensor) -> None:
        if bits:
            arrays[name + "_packed"] = _pack_bits(ids.numpy(), bits)  # (n, ceil(s·bits/8)) uint8
        else:
            arrays[name] = ids.numpy().astype(id_dtype)

    if k is not None:
        store_ids("ids", joined["ids"])
        for suffix, a in _encode_log_probs(
            joined["log_probs"], torch.ones_like(joined["ids"], dtype=torch.bool), precision
        ).items():
            arrays["log_probs" + suffix] = a
        for name in ("log_rest", "log_rest_half"):
            arrays[name] = joined[name].numpy().astype(np.float32 if precision == "float32" else np.float16)
        if m_tail:
            store_ids("tail_ids", joined["tail_ids"])
            arrays["tail_counts"] = joined["tail_counts"].numpy().astype(np.uint8)
            used = joined["tail_counts"] > 0
            for suffix, a in _encode_log_probs(joined["tail_log_probs"], used, precision).items():
                arrays["tail_log_probs" + suffix] = a
    if m is not None:
        store_ids("sample_ids", joined["sample_ids"])
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


def _pick_device(recipe, local_rank: int) -> torch.device:
    if recipe.training.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class _Ranks:
    """The processes building one cache together: this one alone, or those of `torchrun` / `accelerate launch`.

    Only barriers cross processes (every rank computes the same plan from the same files), so a gloo group is
    enough on GPUs too. The group is created only when the launcher's WORLD_SIZE > 1 and none exists yet, and
    torn down again by whoever created it.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist, self._owned = dist, False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
            dist.init_process_group("gloo")
            self._owned = True
        active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if active else 0
        self.world = dist.get_world_size() if active else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank)) if active else 0

    def barrier(self) -> None:
        if self.world > 1:
            self._dist.barrier()

    def close(self) -> None:
        if self._owned:
            self._dist.destroy_process_group()


TOKENIZER_DIR = "tokenizer"


def _save_tokenizer(tokenizer, root: Path) -> None:
    """The tokenizer's files in `root/tokenizer` (written to a temporary folder, then renamed), so that a
    recipe with only `teacher.cache` can train without naming one."""
    final = root / TOKENIZER_DIR
    if final.is_dir():
        return
    tmp = root / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, final)


def _tokenizer_files(root: Path) -> dict[str, str]:
    folder = root / TOKENIZER_DIR
    return {p.name: _sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def build_cache(recipe, log: Callable[[str], None] = print, show_progress: bool = True) -> Path:
    """Run `distill cache`: write (or finish) the folder `recipe.cache.dir` and return it.

    Restarting after a kill continues at the first missing shard; a finished cache with the same plan is left
    as it is. A folder holding a different cache (other teacher, data, tokenizer or settings) is an error.
    Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the missing shards are dealt out round-robin over
    the ranks and rank 0 writes the plan and, once every rank is done, the manifest: the folder ends identical
    to a one-process build.
    """
    ranks = _Ranks()
    try:
        return _build(recipe, ranks, log if ranks.rank == 0 else (lambda _: None), show_progress)
    finally:
        ranks.close()


def _build(recipe, ranks: _Ranks, log: Callable[[str], None], show_progress: bool) -> Path:
    from distill.models import check_vocabulary, load_model, load_tokenizer, resolve_dtype
    from distill.data import load_data

    t, c = recipe.teacher, recipe.cache
    from_file = c.source == "generated"
    if t.path is None and not from_file:
        raise DistillError("recipe key teacher.path: `distill cache` runs the teacher, so it needs teacher.path")
    if recipe.data.train is None:
        raise DistillError("recipe key data.train: no training data given")
    if from_file:
        _check_generated_recipe(recipe)
    # The tokenizer `distill train` will use; a generated file's ids are the teacher's, so a student folder's
    # tokenizer is the last resort there (training checks that the tokenizers agree).
    tokenizer_source = recipe.student.tokenizer or t.path or (recipe.student.path if from_file else None)
    if tokenizer_source is None:
        raise DistillError(
            "recipe key teacher.path: cache.source=generated needs the teacher's tokenizer; "
            "set teacher.path or student.tokenizer"
        )
    tokenizer = load_tokenizer(tokenizer_source, "teacher", t.trust_remote_code, t.revision)
    examples, _ = load_data(recipe, tokenizer, log)
    vocab_size = len(tokenizer)
    root = Path(c.dir)
    generated = None
    if from_file:
        # Every training row is checked before anything is written: a bad row is refused, not half-cached.
        stored_k = _read_generated(recipe, tokenizer, examples, None).stored_k
        sha = _generated_sha256(recipe.data.train)
        generated = {"file": recipe.data.train, "sha256": sha, "stored_top_k": stored_k}

    # Every rank reads the folder before anyone writes to it, so all of them decide the same way.
    existing = {}
    for name in (MANIFEST, PLAN):
        if (root / name).exists():
            existing[name] = json.loads((root / name).read_text(encoding="utf-8"))
    known = next((_known_teacher_files(m, t.path) for m in existing.values()), None) if t.path else None
    plan = _build_plan(recipe, tokenizer, examples, vocab_size, known, generated)
    for name, what in ((MANIFEST, "a finished"), (PLAN, "an unfinished")):
        if name in existing:
            difference = _first_difference(existing[name], plan)
            if difference is not None:
                raise DistillError(
                    f"cache.dir {root} holds {what} cache built with a different {difference}; "
                    "choose another cache.dir or delete that folder"
                )
    if MANIFEST in existing:
        log(f"cache {root} is already complete ({plan['data']['loss_tokens']} tokens)")
        return root
    ranks.barrier()  # everyone has looked; now rank 0 may write
    if ranks.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".*.tmp-*"):  # a killed run's half-written shard or tokenizer
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        if PLAN not in existing:
            atomic.write_json(root / PLAN, plan)
        _save_tokenizer(tokenizer, root)
    ranks.barrier()

    missing = [i for i, s in enumerate(plan["shards"]) if not (root / s["file"]).exists()]
    mine = missing[ranks.rank :: ranks.world]  # round-robin over the ranks; each shard is written by one
    done = len(plan["shards"]) - len(missing)
    if mine and from_file:
        log(f"cache: {len(examples)} examples, {plan['data']['loss_tokens']} loss tokens from {recipe.data.train}")
        _write_generated_shards(recipe, tokenizer, examples, plan, mine, root, log if show_progress else None)
    elif mine:
        device = _pick_device(recipe, ranks.local_rank)
        teacher = load_model(t.path, "teacher", resolve_dtype(t.dtype, device), t.trust_remote_code, t.revision)
        teacher.eval().requires_grad_(False).to(device)
        check_vocabulary(tokenizer, teacher, None)
        log(
            f"cache: {len(examples)} examples, {plan['data']['loss_tokens']} loss tokens, {len(plan['shards'])} shards"
            + (f" ({done} already written)" if done else "")
            + (f", {ranks.world} processes" if ranks.world > 1 else "")
        )
        pad_id = pad_id_of(tokenizer)
        for n, i in enumerate(mine, 1):
            arrays = _shard_arrays(teacher, examples, plan, i, pad_id, device)
            _write_bytes_atomic(root / plan["shards"][i]["file"], _encode_safetensors(arrays))
            if show_progress:
                log(f"cache: shard {done + n * ranks.world}/{len(plan['shards'])} written")
    ranks.barrier()  # every shard exists

    if ranks.rank == 0:
        _write_manifest(root, plan, c, vocab_size, log)
    ranks.barrier()  # nobody returns before the manifest exists
    return root


def _write_manifest(root: Path, plan: dict, c, vocab_size: int, log: Callable[[str], None]) -> None:
    manifest = dict(plan)
    manifest["shards"] = [
        {**s, "bytes": (root / s["file"]).stat().st_size, "sha256": _sha256_file(root / s["file"])}
        for s in plan["shards"]
    ]
    manifest["tokenizer_files"] = _tokenizer_files(root)
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    manifest["bytes"] = total_bytes
    manifest["bytes_per_token"] = {
        **bytes_per_token(
            plan["representation"],
            plan["top_k"] or 0,
            plan["sample_m"] or 0,
            plan["precision"],
            vocab_size,
            c.pack_ids,
            plan.get("tail_samples") or 0,
            "log_rest_half" in (plan["top_k_arrays"] or ()),
        ),
        "files": total_bytes / max(1, plan["data"]["loss_tokens"]),
    }
    atomic.write_json(root / MANIFEST, manifest)
    (root / PLAN).unlink(missing_ok=True)
    per_token = manifest["bytes_per_token"]["files"]
    log(f"cache written to {root}: {total_bytes / 2**20:.1f} MiB, {per_token:.1f} bytes per loss token")


# ---------------------------------------------------------------- building from a `distill generate` file

# Below this, 1 − Σ exp(top-k) is rounding of the stored log-probs (float32 values, or a server's bf16 ones), not
# mass the teacher left: the rest is clamped to it rather than to 0 or a negative number.
_REST_FLOOR = 1e-6


def _check_generated_recipe(recipe) -> None:
    c, d = recipe.cache, recipe.data
    if c.representation != "top_k":
        raise DistillError(
            f"recipe key cache.representation: cache.source=generated stores the file's top-k log-probs; "
            f"{c.representation} needs draws from the teacher's full distribution (use top_k)"
        )
    if c.tail_samples:
        raise DistillError("recipe key cache.tail_samples: cache.source=generated has no tail to draw from; set 0")
    if d.packing:
        raise DistillError(
            "recipe key data.packing: cache.source=generated keeps each row's log-probs, which packing would mix; "
            "set data.packing=false"
        )
    if not Path(d.train).exists():
        raise DistillError(f"recipe key data.train: cache.source=generated reads local files; {d.train} is not one")


def _generated_sha256(source: str) -> str:
    """sha256 of a generated file, or of a folder's files (names and contents, in name order)."""
    path = Path(source)
    if path.is_file():
        return _sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0" + _sha256_file(file).encode())
    return h.hexdigest()


class _TokenIds:
    """Tokens of a generated row -> ids: ids as they are; the token strings of an endpoint that returned no ids
    through the one vocabulary entry whose raw form or decoded text they are. Anything else is ambiguous."""

    def __init__(self, tokenizer):
        self.tokenizer, self.vocab = tokenizer, len(tokenizer)
        self._by_text: dict[str, set[int]] | None = None

    def __call__(self, token: object) -> int:
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < self.vocab:
                raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab} tokens")
            return token
        if not isinstance(token, str):
            raise ValueError(f"token {token!r} is neither an id nor a string")
        if self._by_text is None:  # built once, on the first string: decoding the vocabulary costs seconds
            self._by_text = {}
            raw = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab)))
            for i, form in enumerate(raw):
                self._by_text.setdefault(form, set()).add(i)
                self._by_text.setdefault(self.tokenizer.decode([i]), set()).add(i)
        ids = self._by_text.get(token, set())
        if len(ids) != 1:
            what = "no vocabulary entry" if not ids else f"{len(ids)} vocabulary entries (ambiguous)"
            raise ValueError(
                f"token string {token!r} matches {what}; generate with token ids (vLLM: return_tokens_as_token_ids)"
            )
        return next(iter(ids))


def _row_top_k(
    row: dict,
    ids: list[int],
    mask: list[bool],
    eos: int | None,
    to_id: _TokenIds,
    stored_k: int | None,
    keep: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """The stored top-k of one example's loss tokens (mask[i] and i ≥ 1, in order) from its generated row.

    The example's masked tokens must be the row's completion tokens, in order (a prefix when truncated), each
    with `stored_k` entries (None: the first one sets it). Returns ids (n, w) int64, log-probs (n, w) float32
    (the w = min(keep, stored_k) largest, descending; keep None = all), the log of the rest mass (n,) float32,
    and the entries per token.
    Raises ValueError naming what does not line up.
    """
    top = row.get("top_logprobs")
    if not isinstance(top, list):
        raise ValueError("it has no top_logprobs (generate with generate.logprobs > 0, from a teacher that gives them)")
    produced = row.get("completion_ids", row.get("completion_tokens"))
    if not isinstance(produced, list):
        raise ValueError("it has no completion_ids or completion_tokens to line its top_logprobs up with")
    if len(top) != len(produced):
        raise ValueError(f"top_logprobs has {len(top)} entries for {len(produced)} completion tokens")
    positions = [i for i, counted in enumerate(mask) if counted]
    for n, i in enumerate(positions[: len(produced)]):
        if to_id(produced[n]) != ids[i]:
            raise ValueError(
                f"completion token {n} is {produced[n]!r} in the file but id {ids[i]} in the training example "
                "(re-tokenizing the text does not give the teacher's tokens; keep prompt_ids and completion_ids)"
            )
    if len(positions) > len(produced):
        i = positions[len(produced)]
        what = "the EOS the data loader or chat template appends" if ids[i] == eos else f"id {ids[i]}"
        raise ValueError(f"training token {len(produced)} of the completion ({what}) has no stored log-probs")
    rows_ids, rows_lp = [], []
    for n, i in enumerate(positions):
        if i == 0:  # token 0 is never predicted, so it is never a loss token
            continue
        entries = top[n]
        if not isinstance(entries, list) or not all(isinstance(e, list | tuple) and len(e) == 2 for e in entries):
            raise ValueError(f"top_logprobs of completion token {n} is not a list of [token, log-prob] pairs")
        if stored_k is None:
            stored_k = len(entries)
        if not entries:
            raise ValueError(f"top_logprobs of completion token {n} is empty")
        if len(entries) != stored_k:
            raise ValueError(f"completion token {n} has {len(entries)} top_logprobs, other tokens {stored_k}")
        token_ids = [to_id(t) for t, _ in entries]
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"top_logprobs of completion token {n} repeats a token")
        values = [lp for _, lp in entries]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v) for v in values):
            raise ValueError(f"top_logprobs of completion token {n} has a log-prob that is not a number")
        order = sorted(range(stored_k), key=lambda j: -values[j])[:keep]  # the most probable first
        rows_ids.append([token_ids[j] for j in order])
        rows_lp.append([values[j] for j in order])
    width = 0 if stored_k is None else stored_k if keep is None else min(keep, stored_k)
    lp = np.asarray(rows_lp, dtype=np.float64).reshape(len(rows_lp), width)  # (n, w)
    rest = np.log(np.maximum(1.0 - np.exp(lp).sum(-1), _REST_FLOOR))  # (n,) log(1 − Σ p), clamped
    ids_out = np.asarray(rows_ids, dtype=np.int64).reshape(len(rows_ids), width)  # (n, w)
    return ids_out, lp.astype(np.float32), rest.astype(np.float32), stored_k


class _GeneratedTargets:
    """The stored top-k of every training example, read from the `distill generate` file in example order.

    The rows are tokenized again exactly as `distill.data.build_examples` does; training examples are matched
    to them in order (the ones between are held out for evaluation or have no loss), so an example gets the
    log-probs of the row it came from. Iterating yields (example index, ids, log-probs, log rest) as returned
    by `_row_top_k`; `stored_k` is the number of entries per token in the file once something was read.
    """

    def __init__(self, recipe, tokenizer, examples: Sequence[Example], keep: int | None):
        self.recipe, self.tokenizer, self.examples, self.keep = recipe, tokenizer, examples, keep
        self.stored_k: int | None = None

    def __iter__(self):
        from distill.data import encode_row, read_rows

        d = self.recipe.data
        to_id, eos = _TokenIds(self.tokenizer), self.tokenizer.eos_token_id
        j = 0
        for where, row in read_rows(d.train, d.train_split):
            if j == len(self.examples):
                break
            if isinstance(row, Exception):
                continue  # load_data refused the file or skipped the row already (data.skip_bad_rows)
            try:
                ids, mask = encode_row(row, self.tokenizer, d.ignore_keys)
            except ValueError:
                continue  # likewise
            ids, mask = ids[: d.max_length], mask[: d.max_length]
            example = self.examples[j]
            if example.input_ids != ids or example.loss_mask != mask:
                continue  # held out for evaluation, or without loss tokens
            try:
                top_ids, lp, rest, self.stored_k = _row_top_k(row, ids, mask, eos, to_id, self.stored_k, self.keep)
            except ValueError as e:
                raise DistillError(f"cache.source=generated: row {where}: {e}") from None
            yield j, top_ids, lp, rest
            j += 1
        if j != len(self.examples):
            raise DistillError(f"internal error: {d.train} gave {j} of {len(self.examples)} training examples")


def _read_generated(recipe, tokenizer, examples: Sequence[Example], keep: int | None) -> _GeneratedTargets:
    """Check every training example's row (raising on the first that does not line up) and return the reader."""
    reader = _GeneratedTargets(recipe, tokenizer, examples, keep)
    for _ in reader:
        pass
    return reader


def _write_generated_shards(
    recipe, tokenizer, examples: Sequence[Example], plan: dict, mine: Sequence[int], root: Path, log
) -> None:
    """Write shards `mine` of the plan from the generated file: one pass over it, one shard in memory at a time.
    Every array is a pure function of the file and the plan, so a resumed build is byte-identical."""
    k, precision = plan["top_k"], plan["precision"]
    id_dtype, bits = np.dtype(plan["id_dtype"]), plan.get("id_bits")
    firsts = np.array([s["first_example"] for s in plan["shards"]], dtype=np.int64)
    last_example = {s["first_example"] + s["examples"] - 1: i for i, s in enumerate(plan["shards"])}
    wanted = set(mine)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    written = 0
    for j, ids, lp, rest in _GeneratedTargets(recipe, tokenizer, examples, k):
        index = int(np.searchsorted(firsts, j, side="right")) - 1
        if index not in wanted:
            continue
        parts.append((ids, lp, rest))
        if j not in last_example:
            continue
        shard = plan["shards"][index]
        all_ids = np.concatenate([p[0] for p in parts])  # (n, k)
        all_lp = torch.from_numpy(np.concatenate([p[1] for p in parts]))  # (n, k)
        arrays: dict[str, np.ndarray] = {}
        if bits:
            arrays["ids_packed"] = _pack_bits(all_ids, bits)  # (n, ceil(k·bits/8)) uint8
        else:
            arrays["ids"] = all_ids.astype(id_dtype)
        for suffix, a in _encode_log_probs(all_lp, torch.ones(all_lp.shape, dtype=torch.bool), precision).items():
            arrays["log_probs" + suffix] = a
        rest_dtype = np.float32 if precision == "float32" else np.float16
        arrays["log_rest"] = np.concatenate([p[2] for p in parts]).astype(rest_dtype)
        sizes = [e.loss_tokens for e in examples[shard["first_example"] : shard["first_example"] + shard["examples"]]]
        arrays["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (examples + 1,)
        if len(all_ids) != shard["tokens"] or arrays["offsets"][-1] != len(all_ids):
            raise DistillError(f"internal error: shard {shard['file']} has {len(all_ids)} rows, not {shard['tokens']}")
        _write_bytes_atomic(root / shard["file"], _encode_safetensors(arrays))
        parts, written = [], written + 1
        if log is not None:
            log(f"cache: shard {written}/{len(mine)} written")


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
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
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
    recorded = manifest.get("tokenizer_files")
    if recorded and _tokenizer_files(root) != recorded:
        problems.append(f"{TOKENIZER_DIR}/ does not match the manifest (missing or changed files)")
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
    importance weights; count/m at τ = 1). `distill.losses.sparse` divides stored log-probs by τ, so τ·log w is
    stored, and the rest mass is empty: the estimate sums to one by construction.
    """
    used = counts > 0  # (n, m)
    log_w = counts.float().log() + (1.0 / temperature - 1.0) * log_probs.float()  # (n, m)
    log_w = torch.where(used, log_w, _NEG_INF)
    log_w = log_w - log_w.logsumexp(-1, keepdim=True)
    log_w = torch.where(used, log_w * temperature, _NEG_INF)
    ids = torch.where(used, ids.long(), -1)
    # Stored as distinct ids with counts, so no id repeats; the rest is empty, so the tail treatment is moot.
    return SparseTargets(ids, log_w, torch.full(ids.shape[:1], _NEG_INF), distinct=True)


def with_tail_samples(
    ids: torch.Tensor,
    log_probs: torch.Tensor,
    log_rest: torch.Tensor,
    tail_ids: torch.Tensor,
    tail_counts: torch.Tensor,
    tail_log_probs: torch.Tensor,
    temperature: float,
) -> SparseTargets:
    """Top-k targets whose tail is estimated from draws instead of lumped into one bucket.

    ids, log_probs (n, k) and log_rest (n,) as in `SparseTargets`; tail_ids, tail_counts, tail_log_probs (n, m):
    distinct ids drawn m times from the tail alone (p / rest over the other tokens), their counts (0 = unused
    slot) and their log-probabilities at τ = 1. The estimate of the tail's mass at temperature τ on a drawn
    id j is (count_j / m) · rest · p_j^(1/τ − 1) (importance weights: exactly count_j/m · rest at τ = 1, an
    unbiased estimate of p_j, so the forward-KL gradient stays unbiased while the head is exact).
    `distill.losses.sparse` divides stored log-probs by τ, so τ times the log of that estimate is stored; nothing
    is left in the rest.
    """
    used = tail_counts > 0  # (n, m)
    m = tail_counts.shape[-1]
    log_est = (tail_counts.float() / m).log() + log_rest.float().unsqueeze(-1)  # (n, m) at τ = 1
    log_est = log_est + (1.0 / temperature - 1.0) * tail_log_probs.float()
    tail_lp = torch.where(used, log_est * temperature, _NEG_INF)  # (n, m)
    return SparseTargets(
        torch.cat([ids.long(), torch.where(used, tail_ids.long(), -1)], dim=-1),  # (n, k + m)
        torch.cat([log_probs.float(), tail_lp], dim=-1),  # (n, k + m)
        torch.full_like(log_rest.float(), _NEG_INF),
        distinct=True,  # tail draws are distinct and never among the top-k
    )


class CacheReader:
    """Random access to a finished cache by example index, for the training loop."""

    def __init__(
        self,
        root: Path,
        manifest: dict,
        examples: Sequence[Example],
        representation: str,
        temperature: float,
        tail: str = "bucket",
    ):
        self.root, self.manifest, self.examples = root, manifest, examples
        self.representation, self.temperature, self.tail = representation, temperature, tail
        self._bits = manifest.get("id_bits")
        self._tail_m = manifest.get("tail_samples") if representation == "top_k" else None
        self._firsts = np.array([s["first_example"] for s in manifest["shards"]], dtype=np.int64)
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self._stored = manifest["top_k"] if representation == "top_k" else manifest["sample_m"]  # slots per row
        self.width = self._stored + (self._tail_m or 0)  # slots per row of the targets

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._open:
            self._open[index] = _open_safetensors(self.root / self.manifest["shards"][index]["file"])
        return self._open[index]

    def _rows(self, example: int) -> dict[str, np.ndarray]:
        """The stored arrays of one example's loss tokens, in position order (log-probs decoded to float32)."""
        s = int(np.searchsorted(self._firsts, example, side="right")) - 1
        offsets = self._shard(s)["offsets"]
        j = example - self.manifest["shards"][s]["first_example"]
        return self._read(s, slice(int(offsets[j]), int(offsets[j + 1])))

    def _read(self, shard: int, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """The stored arrays of `rows` (a slice or an index array) of one shard, log-probs decoded to float32.
        Each stored array is read (and each packed one decoded) once for all the rows."""
        arrays = self._shard(shard)
        precision = self.manifest["precision"]
        prefix = "" if self.representation == "top_k" else "sample_"
        if self._bits:
            ids = _unpack_bits(arrays[prefix + "ids_packed"][rows], self._bits, self._stored)
        else:
            ids = arrays[prefix + "ids"][rows]
        lp = _decode_log_probs(arrays, prefix + "log_probs", rows, precision, self._stored)
        if self.representation == "top_k":
            out = {"ids": ids, "log_probs": lp, "log_rest": arrays["log_rest"][rows]}
            if "log_rest_half" in arrays:  # absent from caches of format version 1
                out["log_rest_half"] = arrays["log_rest_half"][rows]
            if self._tail_m:
                if self._bits:
                    out["tail_ids"] = _unpack_bits(arrays["tail_ids_packed"][rows], self._bits, self._tail_m)
                else:
                    out["tail_ids"] = arrays["tail_ids"][rows]
                out["tail_counts"] = arrays["tail_counts"][rows]
                out["tail_log_probs"] = _decode_log_probs(arrays, "tail_log_probs", rows, precision, self._tail_m)
            return out
        return {"ids": ids, "counts": arrays["sample_counts"][rows], "log_probs": lp}

    def _to_targets(self, rows: dict[str, np.ndarray]) -> SparseTargets:
        ids = torch.from_numpy(rows["ids"].astype(np.int64))
        lp = torch.from_numpy(rows["log_probs"])
        if self.representation == "top_k":
            rest = torch.from_numpy(rows["log_rest"].astype(np.float32))
            if self._tail_m:
                return with_tail_samples(
                    ids,
                    lp,
                    rest,
                    torch.from_numpy(rows["tail_ids"].astype(np.int64)),
                    torch.from_numpy(rows["tail_counts"].astype(np.int64)),
                    torch.from_numpy(rows["tail_log_probs"]),
                    self.temperature,
                )
            half = torch.from_numpy(rows["log_rest_half"].astype(np.float32)) if "log_rest_half" in rows else None
            return SparseTargets(ids, lp, rest, distinct=True, tail=self.tail, log_rest_half=half)  # ids never repeat
        return sampled_targets(ids, torch.from_numpy(rows["counts"].astype(np.int64)), lp, self.temperature)

    def example_targets(self, example: int) -> SparseTargets:
        """The stored targets of one example's loss tokens, in position order."""
        return self._to_targets(self._rows(example))

    def targets(self, example_indices: Sequence[int] | torch.Tensor, width: int, device=None) -> SparseTargets:
        """Targets for a batch laid out as its (B, width) label grid, flattened: (B·width) rows.

        Rows of positions that do not count hold no information (all mass in the tail); the losses skip them.
        """
        indices = example_indices.tolist() if isinstance(example_indices, torch.Tensor) else list(example_indices)
        # Vectorized over the batch: per shard, the stored rows of all its examples are gathered with one index
        # array, so each stored array is read and decoded once per batch instead of once per example.
        shards = np.searchsorted(self._firsts, np.asarray(indices, dtype=np.int64), side="right") - 1  # (B,)
        parts, positions = [], []
        for shard in dict.fromkeys(shards.tolist()):  # the batch's shards, in first-seen order
            offsets = np.asarray(self._shard(shard)["offsets"], dtype=np.int64)
            first = self.manifest["shards"][shard]["first_example"]
            rows, where = [], []
            for row in np.flatnonzero(shards == shard).tolist():
                example = indices[row]
                mask = np.asarray(self.examples[example].loss_mask[1 : width + 1], dtype=np.bool_)
                start, end = int(offsets[example - first]), int(offsets[example - first + 1])
                if end - start != int(mask.sum()):
                    raise DistillError(
                        f"teacher cache {self.root}: example {example} has {end - start} stored tokens, "
                        f"the batch {int(mask.sum())} (the cache does not match this data)"
                    )
                rows.append(np.arange(start, end))
                where.append(np.flatnonzero(mask) + row * width)
            parts.append(self._read(shard, np.concatenate(rows)))
            positions.extend(where)
        stored = self._to_targets(
            parts[0] if len(parts) == 1 else {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        )  # (M, s)
        where = torch.from_numpy(np.concatenate(positions))  # (M,) flat positions in the (B, width) grid
        n = len(indices) * width
        ids = torch.full((n, self.width), -1, dtype=torch.long).index_copy_(0, where, stored.ids)  # (B·width, s)
        lp = torch.full((n, self.width), _NEG_INF).index_copy_(0, where, stored.log_probs)  # (B·width, s)
        rest = torch.zeros(n).index_copy_(0, where, stored.log_rest)  # (B·width,)
        half = None
        if stored.log_rest_half is not None:
            half = torch.zeros(n).index_copy_(0, where, stored.log_rest_half)  # (B·width,)
        targets = SparseTargets(ids, lp, rest, distinct=True, tail=stored.tail, log_rest_half=half)
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
    # Re-hashes only weight files whose size or mtime differ from the build's record (see `teacher_files`).
    known = _known_teacher_files(manifest, t.path) if t.path is not None else None
    recorded = manifest["teacher"].get("hash")  # None: a cache built from a generated file naming no teacher
    if t.path is not None and recorded is not None:
        files = teacher_files(t.path, known) if Path(t.path).is_dir() else None
        if recorded != teacher_hash(t.path, t.revision, files):
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
    return CacheReader(root, manifest, examples, choice, recipe.objective.temperature, recipe.cache.tail)


def cache_tokenizer_dir(root: str | Path) -> Path | None:
    """The tokenizer folder stored with a finished cache, its files checked against the manifest; None for a
    cache built before tokenizers were stored. For recipes that train from `teacher.cache` and name neither
    teacher.path nor student.tokenizer."""
    root = Path(root)
    recorded = read_manifest(root).get("tokenizer_files")
    if not recorded:
        return None
    if _tokenizer_files(root) != recorded:
        raise DistillError(f"teacher cache {root}: the files of {TOKENIZER_DIR}/ do not match the manifest")
    return root / TOKENIZER_DIR
