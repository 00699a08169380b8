"""The teacher's cache across tokenizers (objective.cross_tokenizer with `distill cache`, then teacher.cache).

What is stored is the teacher's view of each training text, not the student's positions: per example the teacher's
own token ids of the example's text, exactly what `distill.data.alignment.TokenizerPair.align` gives the online
teacher for it, and at *every* teacher position (not only the anchors of one student) its top-k ids, their
log-probs, the log of the rest mass and log Σ √p over the rest, as a one-tokenizer cache's top_k rows. The
teacher's row at a position depends only on the text before it, so which positions become anchors is decided at
training time by the student's own tokenization: one cache serves every student tokenizer that reads the same
text. The recipe's student tokenizer is needed to build it only to read the data as the student will (the same
examples, truncation and text of prompt/completion and chat rows).

At training each micro-batch is aligned as online (`TokenizerPair.batch`); each example's teacher ids must equal
the stored ones, or be their prefix (a student that truncated the text on a teacher token boundary), else the
run stops with one line naming the example and the first teacher token that differs. The anchors' teacher
positions then pick the stored rows (`CrossCacheReader.anchor_rows`); `distill.losses.cross_tokenizer` compares
the student with a teacher known by its top-k.

Shard arrays (format.py's encodings for ids and log-probs): teacher_ids (all examples' ids, concatenated) and
teacher_offsets (examples + 1,); ids or ids_packed (rows, k), log_probs (+ _range), log_rest, log_rest_half
(rows,) and offsets (examples + 1,) of the rows: an example of n teacher tokens has n − 1 rows, in position order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distill import atomic
from distill.cache.format import (
    _decode_log_probs,
    _encode_log_probs,
    _encode_safetensors,
    _open_safetensors,
    _pack_bits,
    _unpack_bits,
)
from distill.cache.identity import _known_teacher_files, teacher_files, teacher_hash, tokenizer_hash
from distill.data.alignment import Alignment, TokenizerPair
from distill.errors import DistillError
from distill.losses.sparse import tail_half_mass

_NEG_INF = float("-inf")
CHECKED_AT_SET_UP = 64  # examples whose teacher ids are compared with the cache's before the first step


def _teacher_ids_fingerprint(alignments: Sequence[Alignment]) -> str:
    h = hashlib.sha256(str(len(alignments)).encode())
    for a in alignments:
        h.update(np.asarray([len(a.teacher_ids), *a.teacher_ids], dtype=np.int64).tobytes())
    return h.hexdigest()


def _check_recipe(recipe) -> None:
    """Refuse, before anything loads, what a cross-tokenizer build cannot do (one line naming the key)."""
    t, c = recipe.teacher, recipe.cache
    what = f"a cache across tokenizers (objective.cross_tokenizer: {recipe.objective.cross_tokenizer})"
    if t.path is None or t.endpoint is not None or c.source != "teacher":
        raise DistillError(
            f"recipe key teacher.path: {what} runs the local teacher on its own tokenization; set "
            "teacher.path (no teacher.endpoint, cache.source=teacher)"
        )
    if c.representation != "top_k":
        raise DistillError(f"recipe key cache.representation: {what} stores top_k only; set cache.representation=top_k")
    if c.tail_samples:
        raise DistillError(f"recipe key cache.tail_samples: {what} keeps the rest as one mass; set it to 0")
    if recipe.student.tokenizer is None and recipe.student.path is None:
        raise DistillError(
            f"recipe key student.tokenizer: {what} reads the data as the student will; set student.tokenizer "
            "or student.path"
        )
    if recipe.data.packing:
        raise DistillError(f"recipe key data.packing: {what} aligns one document at a time; set data.packing=false")


def read_as_the_student(recipe, log: Callable[[str], None]):
    """What a cross-tokenizer build works from: (the teacher's tokenizer, the training examples as the student reads
    them, the tokenizer pair, each example's alignment, the plan's `cross_tokenizer` identity)."""
    from distill.data import load_data
    from distill.models import load_config, load_tokenizer, max_context

    _check_recipe(recipe)
    t, s = recipe.teacher, recipe.student
    teacher_tokenizer = load_tokenizer(t.path, "teacher", t.trust_remote_code, t.revision)
    student_tokenizer = load_tokenizer(s.tokenizer or s.path, "student", s.trust_remote_code, s.revision)
    examples, _ = load_data(recipe, student_tokenizer, log)
    limit = max_context(load_config(t.path, "teacher", t.trust_remote_code, t.revision))
    pair = TokenizerPair(student_tokenizer, teacher_tokenizer, limit)
    alignments = [pair.align(e.input_ids, e.loss_mask) for e in examples]
    identity = {
        "teacher_ids": _teacher_ids_fingerprint(alignments),
        "teacher_tokens": sum(len(a.teacher_ids) for a in alignments),
        "teacher_max_tokens": limit,
        "student_tokenizer_hash": tokenizer_hash(student_tokenizer),  # what read the data; not checked at training
    }
    return teacher_tokenizer, examples, pair, alignments, identity


def write_cross_shards(recipe, pair, alignments, plan: dict, mine, root: Path, ranks, progress) -> None:
    """Shards `mine` of a cross-tokenizer cache from the local teacher, loaded here on this rank's device."""
    from distill.models import embedding_rows, load_model, pick_device, teacher_dtype

    t = recipe.teacher
    device = pick_device(recipe.training.device, "recipe key training.device", ranks.local_rank)
    # The dtype the online teacher gets (`teacher_dtype`), as the one-tokenizer build does.
    teacher = load_model(t.path, "teacher", teacher_dtype(t.dtype, device), t.trust_remote_code, t.revision)
    teacher.eval().requires_grad_(False).to(device)
    if embedding_rows(teacher) < plan["vocab_size"]:
        raise DistillError(f"teacher has {embedding_rows(teacher)} output rows but its tokenizer {plan['vocab_size']}")
    for n, i in enumerate(mine, 1):
        shard = plan["shards"][i]
        chosen = alignments[shard["first_example"] : shard["first_example"] + shard["examples"]]
        arrays = _shard_arrays(teacher, pair, chosen, plan, device)
        if int(arrays["offsets"][-1]) != shard["tokens"]:
            raise DistillError(f"internal error: shard {shard['file']} has {arrays['offsets'][-1]} rows")
        atomic.write_bytes(root / shard["file"], _encode_safetensors(arrays))
        if progress is not None:
            progress(f"cache: shard {i + 1}/{len(plan['shards'])} written ({n}/{len(mine)} by this process)")


@torch.no_grad()
def _shard_arrays(teacher, pair: TokenizerPair, alignments: Sequence[Alignment], plan: dict, device) -> dict:
    """Every stored array of one shard: the teacher's ids of its examples and its top-k at each of their positions."""
    vocab, k, precision, bits = plan["vocab_size"], plan["top_k"], plan["precision"], plan.get("id_bits")
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "log_probs": [], "log_rest": [], "log_rest_half": []}
    for start in range(0, len(alignments), plan["teacher_batch_size"]):
        batch = pair.batch_of(list(alignments[start : start + plan["teacher_batch_size"]]), 2)  # anchors unused
        ids = batch["teacher_input_ids"].to(device)  # (B, T_t)
        mask = batch["teacher_attention_mask"].to(device)  # (B, T_t)
        logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1, :vocab]  # (B, T_t-1, V)
        predicts = mask[:, 1:] > 0  # (B, T_t-1) position j predicts a real token j+1
        lp = torch.log_softmax(logits[predicts].float(), dim=-1).cpu()  # (n, V) by example, then position
        top_lp, top_ids = lp.topk(k, dim=-1)  # (n, k) each, decreasing
        tail = lp.scatter(-1, top_ids, _NEG_INF)  # (n, V) the rest's log-probs
        for name, value in (("ids", top_ids), ("log_probs", top_lp)):
            parts[name].append(value)
        parts["log_rest"].append(tail.logsumexp(-1))  # (n,)
        parts["log_rest_half"].append(tail_half_mass(tail))  # (n,) the rest's mass at τ = 2
    joined = {name: torch.cat(values) for name, values in parts.items()}
    arrays: dict[str, np.ndarray] = {}
    if bits:
        arrays["ids_packed"] = _pack_bits(joined["ids"].numpy(), bits)
    else:
        arrays["ids"] = joined["ids"].numpy().astype(plan["id_dtype"])
    used = torch.ones_like(joined["ids"], dtype=torch.bool)
    for suffix, a in _encode_log_probs(joined["log_probs"], used, precision).items():
        arrays["log_probs" + suffix] = a
    for name in ("log_rest", "log_rest_half"):
        arrays[name] = joined[name].numpy().astype(np.float32 if precision == "float32" else np.float16)
    lengths = [len(a.teacher_ids) for a in alignments]
    arrays["teacher_ids"] = np.asarray([i for a in alignments for i in a.teacher_ids], dtype=plan["id_dtype"])
    arrays["teacher_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays["offsets"] = np.concatenate([[0], np.cumsum([max(n - 1, 0) for n in lengths])]).astype(np.int64)
    return arrays


# ---------------------------------------------------------------- training from it


def cached_teacher_tokenizer(root: str | Path) -> tuple[str, int | None]:
    """(the teacher tokenizer's folder kept in a cross-tokenizer cache, the teacher's context length), for a recipe
    that trains from teacher.cache without teacher.path."""
    from distill.cache.reader import cache_tokenizer_dir, read_manifest

    manifest = read_manifest(root)
    folder = cache_tokenizer_dir(root)
    if "cross_tokenizer" not in manifest or folder is None:
        raise DistillError(
            f"teacher.cache {root} was not built across tokenizers (objective.cross_tokenizer); build it with "
            "`distill cache` and a cross-tokenizer recipe, or set teacher.path"
        )
    return str(folder), manifest["cross_tokenizer"].get("teacher_max_tokens")


class CrossCacheReader:
    """A finished cross-tokenizer cache, read by example index for the training loop (module docstring)."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.k, self._bits, self._precision = manifest["top_k"], manifest.get("id_bits"), manifest["precision"]
        self._firsts = np.array([s["first_example"] for s in manifest["shards"]], dtype=np.int64)
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._open:
            self._open[index] = _open_safetensors(self.root / self.manifest["shards"][index]["file"])
        return self._open[index]

    def _locate(self, example: int) -> tuple[int, int, list[int]]:
        """(shard, the example's first row in it, its stored teacher ids)."""
        s = int(np.searchsorted(self._firsts, example, side="right")) - 1
        arrays, j = self._shard(s), example - int(self._firsts[s])
        ids = arrays["teacher_ids"][int(arrays["teacher_offsets"][j]) : int(arrays["teacher_offsets"][j + 1])]
        return s, int(arrays["offsets"][j]), ids.tolist()

    def check(self, example: int, teacher_ids: list[int]) -> None:
        """Refuse an example whose teacher ids (from aligning the student's example) are not the cache's."""
        stored = self._locate(example)[2]
        if teacher_ids != stored[: len(teacher_ids)]:
            first = next((p for p, (a, b) in enumerate(zip(teacher_ids, stored, strict=False)) if a != b), len(stored))
            raise DistillError(
                f"teacher.cache {self.root}: example {example}: the teacher's tokenization of the student's text "
                f"differs from the cache's at teacher token {first} (the cache was built from other text or with "
                "another teacher tokenizer); build a cache with this recipe (`distill cache`)"
            )

    def anchor_rows(self, example_indices: Sequence[int], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored teacher rows at a micro-batch's anchors, in the anchors' order, after checking each example's
        teacher ids (batch: `TokenizerPair.batch`'s keys): cached_ids, cached_log_probs (N, k), cached_log_rest,
        cached_log_rest_half (N,)."""
        ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]  # (B, T_t)
        anchors = batch["anchor_teacher"].numpy()  # (N,) flat positions of the (B, T_t-1) grid
        width = max(ids.shape[1] - 1, 1)
        row_of, position = anchors // width, anchors % width  # (N,) each
        shard_of = np.zeros(len(anchors), dtype=np.int64)
        stored_row = np.zeros(len(anchors), dtype=np.int64)
        for b, example in enumerate(example_indices):
            n = int(mask[b].sum())
            shard, first_row, stored = self._locate(example)
            if stored or n > 1:  # an empty text keeps one visible pad token and has nothing stored
                self.check(example, ids[b, :n].tolist())
            chosen = np.flatnonzero(row_of == b)
            shard_of[chosen], stored_row[chosen] = shard, first_row + position[chosen]
        out = {
            "cached_ids": np.zeros((len(anchors), self.k), dtype=np.int64),
            "cached_log_probs": np.zeros((len(anchors), self.k), dtype=np.float32),
            "cached_log_rest": np.zeros(len(anchors), dtype=np.float32),
            "cached_log_rest_half": np.zeros(len(anchors), dtype=np.float32),
        }
        for shard in np.unique(shard_of).tolist() if len(anchors) else []:
            chosen = np.flatnonzero(shard_of == shard)
            rows, arrays = stored_row[chosen], self._shard(shard)
            if self._bits:
                out["cached_ids"][chosen] = _unpack_bits(arrays["ids_packed"][rows], self._bits, self.k)
            else:
                out["cached_ids"][chosen] = arrays["ids"][rows]
            out["cached_log_probs"][chosen] = _decode_log_probs(arrays, "log_probs", rows, self._precision, self.k)
            out["cached_log_rest"][chosen] = arrays["log_rest"][rows]
            out["cached_log_rest_half"][chosen] = arrays["log_rest_half"][rows]
        return {name: torch.from_numpy(value) for name, value in out.items()}


def open_cross_cache(recipe, pair: TokenizerPair, examples) -> CrossCacheReader:
    """Check that teacher.cache was built across tokenizers for this teacher (its tokenizer and, when teacher.path
    is given, its weights) and this many examples, and that the first examples' teacher ids are the cache's; then
    open it. Raises DistillError naming what differs."""
    from distill.cache.reader import read_manifest

    root = Path(recipe.teacher.cache)
    manifest, where = read_manifest(root), f"teacher.cache {root}"
    if "cross_tokenizer" not in manifest:
        raise DistillError(
            f"{where}: built for one tokenizer (the student's positions); objective.cross_tokenizer needs a cache "
            "built with it (`distill cache` with this recipe)"
        )
    if manifest["tokenizer_hash"] != tokenizer_hash(pair.teacher.tokenizer):
        raise DistillError(
            f"{where}: built with a different teacher tokenizer than the recipe's (its ids would differ)"
        )
    t = recipe.teacher
    if t.path is not None and Path(t.path).is_dir():
        files = teacher_files(t.path, _known_teacher_files(manifest, t.path))
        if manifest["teacher"].get("hash") != teacher_hash(t.path, t.revision, files):
            raise DistillError(f"{where}: built with a different teacher than teacher.path {t.path}")
    if manifest["data"]["examples"] != len(examples):
        raise DistillError(
            f"{where}: built from {manifest['data']['examples']} training examples, the recipe's data gives "
            f"{len(examples)} (check data.train, data.eval and training.seed)"
        )
    if recipe.cache.train_on == "sampled":
        raise DistillError(f"recipe key cache.train_on: {where} stores top_k (across tokenizers), not sampled")
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise DistillError(f"{where}: shard {shard['file']} is missing or truncated (run `distill cache verify`)")
    reader = CrossCacheReader(root, manifest)
    for i, e in enumerate(examples[:CHECKED_AT_SET_UP]):
        reader.check(i, pair.align(e.input_ids, e.loss_mask).teacher_ids)
    return reader
