"""Built from a `distill generate` file instead (``cache.source: generated``): the top-k log-probs the file stores
per completion token become the cached top-k (k = the number stored, at most cache.top_k), the rest is
log(1 − Σ exp(top-k)) clamped at 1e-6, and no teacher is loaded or run. The teacher is then known by the file's
sha256 (and teacher.path's hash when the recipe names one). Rows are tokenized as `distill.data` does (their
prompt_ids + completion_ids when present); every loss token of a training example must be a completion token
with stored log-probs, and a row where that fails (no top_logprobs, ids that do not line up, an EOS the loader
adds) stops the build with one line naming it: made-up targets would be worse than none. log Σ √p of the tail is
unknown, so training at τ ≠ 1 assumes a flat tail (`distill.losses.sparse`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from distill import atomic
from distill.cache.format import _encode_log_probs, _encode_safetensors, _pack_bits
from distill.cache.identity import _sha256_file
from distill.data import Example
from distill.errors import DistillError

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
    ids_out = np.asarray(rows_ids, dtype=np.int64).reshape(len(rows_ids), width)  # (n, w)
    return ids_out, lp.astype(np.float32), log_rest_of(lp), stored_k


def log_rest_of(log_probs: np.ndarray) -> np.ndarray:
    """(n, k) top-k log-probs -> (n,) float32 log(1 − Σ p) of the mass outside them, clamped at `_REST_FLOOR`
    (summed in float64: the top-k of a peaked teacher leave a rest far below float32's resolution of 1)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    return np.log(np.maximum(1.0 - np.exp(lp).sum(-1), _REST_FLOOR)).astype(np.float32)


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
    write_top_k_shards(_GeneratedTargets(recipe, tokenizer, examples, plan["top_k"]), examples, plan, mine, root, log)


def write_top_k_shards(
    rows: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
    examples: Sequence[Example],
    plan: dict,
    mine: Sequence[int],
    root: Path,
    log,
) -> None:
    """Write shards `mine` of a top-k plan without a teacher's full distribution (a generated file, a server's
    prompt log-probs): `rows` yields (example index, ids (n, k), log-probs (n, k), log rest (n,)) for every
    example of those shards, in example order (others are skipped). One shard is in memory at a time; every array
    is a pure function of the rows and the plan, so a resumed build is byte-identical."""
    precision = plan["precision"]
    id_dtype, bits = np.dtype(plan["id_dtype"]), plan.get("id_bits")
    firsts = np.array([s["first_example"] for s in plan["shards"]], dtype=np.int64)
    last_example = {s["first_example"] + s["examples"] - 1: i for i, s in enumerate(plan["shards"])}
    wanted = set(mine)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    written = 0
    for j, ids, lp, rest in rows:
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
        atomic.write_bytes(root / shard["file"], _encode_safetensors(arrays))
        parts, written = [], written + 1
        if log is not None:
            log(f"cache: shard {written}/{len(mine)} written")
