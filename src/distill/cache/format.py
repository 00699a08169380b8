"""The cache folder's files: shard names, the safetensors layout, atomic writes, bit-packed ids and quantized
log-probs, and the bytes each loss token costs.

Folder layout::

    manifest.json                 written last: identities, settings, token counts, one sha256 per shard and
                                  per tokenizer file, the teacher files' (size, mtime, sha256)
    shard-00000.safetensors ...   ids (uint16 when the vocabulary has at most 65536 tokens, else uint32; or,
                                  with cache.pack_ids, ceil(log2 V) bits each in uint8 rows), log-probs
                                  (float32 / float16 / 8- or 4-bit codes), offsets of each example's rows
    tokenizer/                    the tokenizer's files, for recipes that name no other tokenizer

Shards hold consecutive examples of the trainer's own example list (`distill.data.load_data`, i.e. after
the held-out split) and end at example boundaries; row r of a shard belongs to a loss token of an example in
order, so an example's rows are `offsets[j]:offsets[j+1]` (random access for shuffled training, through
memory maps). With ``precision: int8`` / ``int4`` each row stores its highest and lowest log-prob in float16
and 8-bit / 4-bit codes uniformly between them (int4 codes two per byte).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

FORMAT = "distill-cache"
VERSION = 2  # 2: optional bit-packed ids, int4, the tokenizer folder, teacher file records
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PLAN = "build.json"
# The tokenizer's files, inside the cache folder.
TOKENIZER_DIR = "tokenizer"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


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
