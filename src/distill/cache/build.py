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

to a temporary name and renamed, the manifest last. A build killed at any moment restarts at the first
missing shard. Shards are a pure function of the plan: teacher in eval mode, fixed examples and batches per
shard, one seeded generator per shard for sampling; on the same machine and software a resumed build is
byte-identical to an uninterrupted one. Under `torchrun` / `accelerate launch` the missing shards are dealt
out over the ranks, and the folder ends identical to a one-process build.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distill import atomic
from distill.cache.format import (
    DEFAULT_TAIL_SAMPLES,
    FORMAT,
    MANIFEST,
    PLAN,
    TOKENIZER_DIR,
    VERSION,
    _encode_log_probs,
    _encode_safetensors,
    _pack_bits,
    bytes_per_token,
    id_bits,
    shard_name,
)
from distill.cache.generated import (
    _check_generated_recipe,
    _generated_sha256,
    _read_generated,
    _write_generated_shards,
    write_top_k_shards,
)
from distill.cache.identity import (
    _known_teacher_files,
    _sha256_file,
    _tokenizer_files,
    teacher_files,
    teacher_hash,
    tokenizer_hash,
)
from distill.cache.served import ServedTeacher, check_served_recipe
from distill.data import Example, collate, data_fingerprint, forward_inputs, load_data, pad_id_of
from distill.errors import DistillError
from distill.losses.dense import IGNORE_INDEX
from distill.losses.sparse import tail_half_mass
from distill.models import pick_device

_NEG_INF = float("-inf")


def _plan_shards(rows: Sequence[int], shard_tokens: int) -> list[dict]:
    """Consecutive examples per shard, from each example's stored rows (its loss tokens, or across tokenizers its
    teacher positions)."""
    shards, first, tokens = [], 0, 0
    for i, n in enumerate(rows):
        tokens += n
        if tokens >= shard_tokens or i == len(rows) - 1:
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
    served: dict | None = None,
    cross: dict | None = None,
) -> dict:
    """The build's plan. `generated` ({"file", "sha256", "stored_top_k"}) for cache.source=generated: the
    teacher is then known by that file, and by teacher.path's hash only when the recipe names one. `served`
    (`ServedTeacher.identity` + how it was asked) for a teacher at teacher.endpoint: known by its model card.
    `cross` ({"identity", "rows"}) across tokenizers (`distill.cache.cross`): rows are the teacher's positions."""
    t, d, c = recipe.teacher, recipe.data, recipe.cache
    if served is not None:
        known_files = None
    files = teacher_files(t.path, known_files) if t.path is not None and served is None else {}
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
    if served is not None:
        # Only the server's top-k are known: no tail to draw from, no √p sum; teacher.path gave the tokenizer.
        teacher = {"path": None, "revision": None, "dtype": None, "files": {}, **served}
        tail_samples, arrays = 0, ["ids", "log_probs", "log_rest"]
    plan = {
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
        # Nothing is drawn from a generated file or a server's top-k; requests are one sequence each.
        "seed": recipe.training.seed if generated is None and served is None else None,
        "teacher_batch_size": c.batch_size if generated is None and served is None else None,
        "positions": "loss tokens only (labels != -100), in example order",
        "shards": _plan_shards([e.loss_tokens for e in examples], c.shard_tokens),
    }
    if cross is not None:
        plan["cross_tokenizer"] = cross["identity"]
        plan["positions"] = "every teacher position of each example's text, in example order"
        plan["shards"] = _plan_shards(cross["rows"], c.shard_tokens)
        plan["tail_samples"] = None  # the rest is kept as one mass (no tail draws)
    return plan


def _first_difference(before: dict, now: dict) -> str | None:
    """The recipe key (or identity) that makes an existing plan or manifest `before` differ from `now`."""
    planned = ("file", "first_example", "examples", "tokens")
    before = {**before, "shards": [{k: s.get(k) for k in planned} for s in before.get("shards", [])]}
    # The teacher by content: its files' recorded mtimes may change (a copy, a touch) without changing it, and a
    # served teacher may move to another URL or be asked another way.
    where = ("files", "endpoint", "logprobs_via", "tokenizer")
    before["teacher"] = {k: v for k, v in before.get("teacher", {}).items() if k not in where}
    now = {**now, "teacher": {k: v for k, v in now.get("teacher", {}).items() if k not in where}}
    if before.get("source", "teacher") != now.get("source", "teacher"):
        return "cache.source"
    if before["teacher"].get("generated") != now["teacher"].get("generated"):
        return "generated file (data.train's content or its top_logprobs)"
    for key in ("format", "version", "teacher", "tokenizer_hash", "cross_tokenizer", "data", "vocab_size", "shards"):
        if before.get(key) != now.get(key):
            names = {"tokenizer_hash": "tokenizer", "shards": "cache.shard_tokens"}
            return names.get(key, "objective.cross_tokenizer or student tokenizer" if key == "cross_tokenizer" else key)
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


def _save_tokenizer(tokenizer, root: Path) -> None:
    """The tokenizer's files in `root/tokenizer` (written to a temporary folder, then renamed), so that a
    recipe with only `teacher.cache` can train without naming one."""
    final = root / TOKENIZER_DIR
    if final.is_dir():
        return
    tmp = root / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, final)


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
    from distill.models import load_tokenizer

    if recipe.objective.cross_tokenizer != "off":  # the teacher's own tokenization of each text
        return _build_cross(recipe, ranks, log, show_progress)
    t, c = recipe.teacher, recipe.cache
    from_file = c.source == "generated"
    from_server = t.endpoint is not None and not from_file  # the served teacher, as for `distill generate`
    if recipe.teachers:
        raise DistillError(
            "recipe key teachers: `distill cache` builds one teacher's cache; run it once per teacher with a "
            "recipe of that teacher (teacher: ...) and its rows as data.train, then name the caches in teachers.*.cache"
        )
    if t.path is None and not from_file and not from_server:
        raise DistillError(
            "recipe key teacher.path: `distill cache` runs the teacher, so it needs teacher.path (or teacher.endpoint)"
        )
    if recipe.data.train is None:
        raise DistillError("recipe key data.train: no training data given")
    if from_file:
        _check_generated_recipe(recipe)
    if from_server:
        check_served_recipe(recipe)
    # The tokenizer `distill train` will use; a generated file's or a server's ids are the teacher's, so a student
    # folder's tokenizer is the last resort there (training checks that the tokenizers agree).
    fallback = recipe.student.path if from_file or from_server else None
    tokenizer_source = recipe.student.tokenizer or t.path or fallback
    if tokenizer_source is None:
        what = "cache.source=generated" if from_file else "a cache from teacher.endpoint"
        raise DistillError(
            f"recipe key teacher.path: {what} needs the teacher's tokenizer; set teacher.path or student.tokenizer"
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
    served = ServedTeacher(t, recipe.generate, tokenizer, min(c.top_k, vocab_size), log) if from_server else None
    try:
        identity = None
        if served is not None:
            served.check(examples)  # the server's limits, before anything is written
            identity = {**served.identity(), "logprobs_via": served.mode, "tokenizer": tokenizer_source}
        plan = _prepare_folder(recipe, root, tokenizer, examples, vocab_size, generated, identity, ranks, log)
        if plan is None:
            return root
        missing = [i for i, s in enumerate(plan["shards"]) if not (root / s["file"]).exists()]
        mine = missing[ranks.rank :: ranks.world]  # round-robin over the ranks; each shard is written by one
        done = len(plan["shards"]) - len(missing)
        if mine:
            progress = log if show_progress else None
            source = f" from {recipe.data.train}" if from_file else ""
            if served is not None:
                source = f" from {served.model_name} at {served.url} ({served.concurrency} requests at a time)"
            log(
                f"cache: {len(examples)} examples, {plan['data']['loss_tokens']} loss tokens, {len(plan['shards'])} "
                "shards"
                + (f" ({done} already written)" if done else "")
                + (f", {ranks.world} processes" if ranks.world > 1 else "")
                + source
            )
            if from_file:
                _write_generated_shards(recipe, tokenizer, examples, plan, mine, root, progress)
            elif served is not None:
                wanted = [plan["shards"][i] for i in mine]
                indices = [j for s in wanted for j in range(s["first_example"], s["first_example"] + s["examples"])]
                write_top_k_shards(served.in_order(examples, indices), examples, plan, mine, root, progress)
            else:
                _write_teacher_shards(recipe, tokenizer, examples, plan, mine, root, ranks, done, progress)
    finally:
        if served is not None:
            served.close()
    ranks.barrier()  # every shard exists

    if ranks.rank == 0:
        _write_manifest(root, plan, c, vocab_size, log)
    ranks.barrier()  # nobody returns before the manifest exists
    return root


def _build_cross(recipe, ranks: _Ranks, log: Callable[[str], None], show_progress: bool) -> Path:
    """`distill cache` for a cross-tokenizer recipe (`distill.cache.cross`): the teacher's top-k at every position
    of its own tokenization of each training text, read as the student reads the data."""
    from distill.cache.cross import read_as_the_student, write_cross_shards

    teacher_tokenizer, examples, pair, alignments, identity = read_as_the_student(recipe, log)
    rows = [max(len(a.teacher_ids) - 1, 0) for a in alignments]  # position j predicts token j+1
    root, vocab = Path(recipe.cache.dir), len(teacher_tokenizer)
    cross = {"identity": identity, "rows": rows}
    plan = _prepare_folder(recipe, root, teacher_tokenizer, examples, vocab, None, None, ranks, log, cross)
    if plan is None:
        return root
    missing = [i for i, shard in enumerate(plan["shards"]) if not (root / shard["file"]).exists()]
    mine = missing[ranks.rank :: ranks.world]  # round-robin over the ranks, as for one tokenizer
    if mine:
        log(
            f"cache across tokenizers: {len(examples)} examples, {sum(rows)} teacher positions "
            f"({plan['data']['loss_tokens']} student loss tokens), {len(plan['shards'])} shards"
        )
        write_cross_shards(recipe, pair, alignments, plan, mine, root, ranks, log if show_progress else None)
    ranks.barrier()
    if ranks.rank == 0:
        _write_manifest(root, plan, recipe.cache, vocab, log)
    ranks.barrier()
    return root


def _prepare_folder(
    recipe, root: Path, tokenizer, examples, vocab_size, generated, served, ranks, log, cross: dict | None = None
) -> dict | None:
    """The plan, checked against what the folder already holds (None: the cache is complete), and the folder
    ready for shards: the plan and the tokenizer written, a killed run's temporary files removed."""
    t = recipe.teacher
    # Every rank reads the folder before anyone writes to it, so all of them decide the same way.
    existing = {}
    for name in (MANIFEST, PLAN):
        if (root / name).exists():
            existing[name] = json.loads((root / name).read_text(encoding="utf-8"))
    known = next((_known_teacher_files(m, t.path) for m in existing.values()), None) if t.path else None
    plan = _build_plan(recipe, tokenizer, examples, vocab_size, known, generated, served, cross)
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
        return None
    ranks.barrier()  # everyone has looked; now rank 0 may write
    if ranks.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".*.tmp-*"):  # a killed run's half-written shard or tokenizer
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        if PLAN not in existing:
            atomic.write_json(root / PLAN, plan)
        _save_tokenizer(tokenizer, root)
    ranks.barrier()
    return plan


def _write_teacher_shards(recipe, tokenizer, examples, plan: dict, mine, root: Path, ranks, done, progress) -> None:
    """Shards `mine` from the local teacher (teacher.path), loaded here on this rank's device."""
    from distill.models import check_vocabulary, load_model, teacher_dtype

    t = recipe.teacher
    device = pick_device(recipe.training.device, "recipe key training.device", ranks.local_rank)
    teacher = load_model(t.path, "teacher", teacher_dtype(t.dtype, device), t.trust_remote_code, t.revision)
    teacher.eval().requires_grad_(False).to(device)
    check_vocabulary(tokenizer, teacher, None)
    pad_id = pad_id_of(tokenizer)
    for n, i in enumerate(mine, 1):
        arrays = _shard_arrays(teacher, examples, plan, i, pad_id, device)
        atomic.write_bytes(root / plan["shards"][i]["file"], _encode_safetensors(arrays))
        if progress is not None:
            progress(f"cache: shard {done + n * ranks.world}/{len(plan['shards'])} written")


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
