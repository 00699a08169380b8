"""Reading a cache back: the manifest, its verification, and the per-batch sparse targets that training uses
(`open_cache_for_training`), checked against the recipe's teacher, tokenizer and data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from distill.cache.format import (
    FORMAT,
    MANIFEST,
    PLAN,
    READABLE_VERSIONS,
    TOKENIZER_DIR,
    VERSION,
    _decode_log_probs,
    _open_safetensors,
    _unpack_bits,
)
from distill.cache.identity import (
    _known_teacher_files,
    _sha256_file,
    _tokenizer_files,
    teacher_files,
    teacher_hash,
    tokenizer_hash,
)
from distill.data import Example, data_fingerprint
from distill.errors import DistillError
from distill.losses.sparse import SparseTargets

_NEG_INF = float("-inf")


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


def sampled_targets(ids: torch.Tensor, counts: torch.Tensor, log_probs: torch.Tensor) -> SparseTargets:
    """Sampled draws -> `SparseTargets` holding the sample estimate at τ = 1 and the draws' log-probabilities.

    ids, counts, log_probs (n, m): distinct drawn ids, how often each was drawn (0 = unused slot) and the
    teacher's log-probability at τ = 1. The estimate is count/m; `distill.losses.sparse` reweights it to the
    objective's temperature (w ∝ count · p^(1/τ − 1), self-normalized importance weights) from `draw_log_probs`.
    The rest mass is empty: the estimate sums to one by construction.
    """
    used = counts > 0  # (n, m)
    log_w = torch.where(used, counts.float().log(), _NEG_INF)  # (n, m)
    log_w = torch.where(used, log_w - log_w.logsumexp(-1, keepdim=True), _NEG_INF)
    ids = torch.where(used, ids.long(), -1)
    draws = torch.where(used, log_probs.float(), _NEG_INF)  # (n, m)
    # Stored as distinct ids with counts, so no id repeats; the rest is empty, so the tail treatment is moot.
    return SparseTargets(ids, log_w, torch.full(ids.shape[:1], _NEG_INF), distinct=True, draw_log_probs=draws)


def with_tail_samples(
    ids: torch.Tensor,
    log_probs: torch.Tensor,
    log_rest: torch.Tensor,
    tail_ids: torch.Tensor,
    tail_counts: torch.Tensor,
    tail_log_probs: torch.Tensor,
) -> SparseTargets:
    """Top-k targets whose tail is estimated from draws instead of lumped into one bucket.

    ids, log_probs (n, k) and log_rest (n,) as in `SparseTargets`; tail_ids, tail_counts, tail_log_probs (n, m):
    distinct ids drawn m times from the tail alone (p / rest over the other tokens), their counts (0 = unused
    slot) and their log-probabilities at τ = 1. The estimate of the tail's mass on a drawn id j is
    (count_j / m) · rest at τ = 1, an unbiased estimate of p_j, so the forward-KL gradient stays unbiased while the
    head is exact; `distill.losses.sparse` reweights it to (count_j / m) · rest · p_j^(1/τ − 1) at the objective's
    temperature (importance weights) from `draw_log_probs`. Nothing is left in the rest.
    """
    used = tail_counts > 0  # (n, m)
    m = tail_counts.shape[-1]
    log_est = (tail_counts.float() / m).log() + log_rest.float().unsqueeze(-1)  # (n, m) at τ = 1
    tail_lp = torch.where(used, log_est, _NEG_INF)  # (n, m)
    return SparseTargets(
        torch.cat([ids.long(), torch.where(used, tail_ids.long(), -1)], dim=-1),  # (n, k + m)
        torch.cat([log_probs.float(), tail_lp], dim=-1),  # (n, k + m)
        torch.full_like(log_rest.float(), _NEG_INF),
        distinct=True,  # tail draws are distinct and never among the top-k
        # The top-k entries are exact (their own log-probs); the draws carry the teacher's.
        draw_log_probs=torch.cat([log_probs.float(), torch.where(used, tail_log_probs.float(), _NEG_INF)], dim=-1),
    )


class CacheReader:
    """Random access to a finished cache by example index, for the training loop."""

    def __init__(
        self,
        root: Path,
        manifest: dict,
        examples: Sequence[Example],
        representation: str,
        tail: str = "bucket",
    ):
        # No temperature: targets are the teacher's τ = 1 values; the loss applies the objective's τ.
        self.root, self.manifest, self.examples = root, manifest, examples
        self.representation, self.tail = representation, tail
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
                )
            half = torch.from_numpy(rows["log_rest_half"].astype(np.float32)) if "log_rest_half" in rows else None
            return SparseTargets(ids, lp, rest, distinct=True, tail=self.tail, log_rest_half=half)  # ids never repeat
        return sampled_targets(ids, torch.from_numpy(rows["counts"].astype(np.int64)), lp)

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
        half = draws = None
        if stored.log_rest_half is not None:
            half = torch.zeros(n).index_copy_(0, where, stored.log_rest_half)  # (B·width,)
        if stored.draw_log_probs is not None:
            draws = torch.full((n, self.width), _NEG_INF).index_copy_(0, where, stored.draw_log_probs)  # (B·width, s)
        targets = SparseTargets(
            ids, lp, rest, distinct=True, tail=stored.tail, log_rest_half=half, draw_log_probs=draws
        )
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
    if "cross_tokenizer" in manifest:  # the teacher's own ids and positions (distill.cache.cross)
        raise DistillError(
            f"{where}: built across tokenizers; train from it with objective.cross_tokenizer uld or aligned"
        )
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
    served = "endpoint" in manifest["teacher"]  # known by its server's model card; teacher.path gave the tokenizer
    if t.path is not None and recorded is not None and not served:
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
    return CacheReader(root, manifest, examples, choice, recipe.cache.tail)


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
