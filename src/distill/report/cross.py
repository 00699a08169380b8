"""Models scored against a teacher with another tokenizer, on the same text (`distill eval --cross-tokenizer`, and the
report of an objective.cross_tokenizer run).

Each model's eval examples are its own tokenization of the data; the teacher reads the same text tokenized its own
way (`distill.data.alignment`). Per-token numbers (cross-entropy, perplexity, top-1 accuracy) count each model's own
tokens, which cover different amounts of text under different tokenizers, so they do not compare across
vocabularies (their retention is left out); these do:

- bits_per_byte  the cross-entropy summed over the model's counted tokens, in bits, divided by the UTF-8 bytes those
                 tokens stand for (markers such as EOS add their loss and no bytes). The teacher's: its tokens that
                 lie inside the same counted bytes.
- agreement      at 1:1 spans (a counted token of the model and a teacher token standing for the same bytes after the
                 same text), the share where the two argmaxes stand for the same piece (or the same marker).
- kl_to_teacher  at 1:1 spans, KL(teacher ‖ model) over the pieces both vocabularies share plus one tail bucket
                 (`distill.losses.cross_tokenizer.aligned_divergence`).

The draft keys of the one-tokenizer report are present and null, with a `draft_note` saying why (a draft proposes
token ids the teacher must share), so report consumers see the same schema.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields

import torch

from distill.data import build_examples, collate, forward_inputs, pad_id_of
from distill.data.alignment import Alignment, TokenizerPair
from distill.errors import DistillError
from distill.losses.cross_tokenizer import BucketMap, aligned_divergence
from distill.losses.heads import backbone_hidden_states
from distill.losses.objective import Objective
from distill.models import (
    DTYPES,
    count_parameters,
    has_tokenizer,
    load_model,
    load_tokenizer,
    max_context,
    pick_device,
    resolve_dtype,
)
from distill.report.quality import checked_head
from distill.report.retention import retention_of, speedup_of
from distill.report.speed import measure_speed, model_device, size_on_disk

DEFINITIONS = {
    "cross_tokenizer": "the teacher and a model have different tokenizers: each model is scored on its own "
    "tokenization of the eval text and the teacher on its own tokenization of the same text, both placed on the "
    "text's UTF-8 byte offsets; cross_entropy, perplexity and top1_accuracy count each model's own tokens and are "
    "not comparable across tokenizers (no retention is given for cross_entropy)",
    "bits_per_byte": "cross-entropy summed over the counted tokens, in bits, divided by the UTF-8 bytes they stand "
    "for (EOS and other markers: their loss, no bytes); the teacher's tokens count where they lie inside the bytes "
    "a model's counted tokens cover",
    "agreement": "at 1:1 spans (a counted token and a teacher token standing for the same bytes after the same "
    "text): share where the model's argmax and the teacher's argmax stand for the same piece",
    "kl_to_teacher": "at 1:1 spans: KL(teacher ‖ model) at temperature 1 over the pieces both vocabularies share "
    "plus one bucket for the rest of each side's mass, nats",
    "aligned_share": "share of a model's counted tokens that are 1:1 spans (where agreement and KL are measured)",
    "teacher_bits_per_byte": "the teacher's bits per byte on exactly the bytes this model's counted tokens cover; "
    "the bits_per_byte retention is teacher_bits_per_byte / bits_per_byte",
}
# Assisted generation proposes the draft's token ids to the teacher: it needs one vocabulary.
_NO_DRAFT = {
    "draft_acceptance_rate": None,
    "speculative_decode_speedup": None,
    "draft_note": "not measured: the model and the teacher have different tokenizers (a draft proposes token ids "
    "of the teacher's vocabulary)",
}
_KL = Objective("forward_kl")
_CHUNK_ROWS = 512


@dataclass
class _Sums:
    tokens: float = 0.0
    nll: float = 0.0
    correct: float = 0.0
    bytes: float = 0.0
    aligned: float = 0.0
    agree: float = 0.0
    kl: float = 0.0

    def add(self, other: _Sums) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def means(self, teacher: bool) -> dict:
        n = max(self.tokens, 1.0)
        ce = self.nll / n
        at = self.aligned
        return {
            "tokens": int(self.tokens),
            "cross_entropy": ce,
            "perplexity": math.exp(min(ce, 700.0)),
            "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else None,
            "top1_accuracy": self.correct / n,
            "agreement": 1.0 if teacher else (self.agree / at if at else None),
            "kl_to_teacher": 0.0 if teacher else (self.kl / at if at else None),
            "aligned_share": None if teacher else at / n,
        }


def _load(spec):
    device = pick_device(spec.device, f"{spec.name} device")
    if spec.dtype != "auto" and spec.dtype not in DTYPES:
        raise DistillError(f"{spec.name} dtype {spec.dtype!r}: choose auto, {', '.join(DTYPES)}")
    model = load_model(spec.path, spec.name, resolve_dtype(spec.dtype, device))
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def _rows(model, head, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, vocab: int):
    """The logits (n, vocab) of `model` at flat output positions `index` of its (B, T-1) grid, `_CHUNK_ROWS` at a
    time (a generator of (positions, logits))."""
    device = model_device(model)
    ids, mask, index = ids.to(device), mask.to(device), index.to(device)
    if head is not None:
        hidden = backbone_hidden_states(model, ids, mask)[:, :-1]  # (B, T-1, H)
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B·(T-1), H)
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (B, T-1, V')
        flat = logits.reshape(-1, logits.shape[-1])
    for first in range(0, index.numel(), _CHUNK_ROWS):
        at = index[first : first + _CHUNK_ROWS]
        rows = flat.index_select(0, at)
        rows = head.logits(rows) if head is not None else rows
        yield at, rows[:, :vocab].float()


def _counted_bytes(a: Alignment, mask: list[bool]) -> list[tuple[int, int]]:
    """The byte intervals the counted targets of the model's sequence cover, merged."""
    spans = sorted(a.student_spans[k] for k in range(1, len(mask)) if mask[k])
    merged: list[list[int]] = []
    for start, end in spans:
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _teacher_targets(pair: TokenizerPair, alignments, examples, teacher_width: int):
    """(flat positions of the teacher's (B, T_t-1) grid whose targets lie in a model's counted bytes, the target
    ids, the bytes they stand for)."""
    positions, targets, total = [], [], 0
    markers = {pair.teacher.bos_id, pair.teacher.eos_id}
    for row, (a, e) in enumerate(zip(alignments, examples, strict=True)):
        intervals = _counted_bytes(a, e.loss_mask)
        for m in range(1, len(a.teacher_ids)):
            start, end = a.teacher_spans[m]
            if end > start and any(s <= start and end <= t for s, t in intervals):
                positions.append(row * (teacher_width - 1) + m - 1)
                targets.append(a.teacher_ids[m])
                total += 0 if a.teacher_ids[m] in markers else end - start
    return torch.tensor(positions, dtype=torch.long), torch.tensor(targets, dtype=torch.long), total


def _student_bytes(pair: TokenizerPair, alignments, examples) -> int:
    markers = {pair.student.bos_id, pair.student.eos_id}
    total = 0
    for a, e in zip(alignments, examples, strict=True):
        for k in range(1, len(e.input_ids)):
            if e.loss_mask[k] and e.input_ids[k] not in markers:
                total += a.student_spans[k][1] - a.student_spans[k][0]
    return total


def _nll_and_correct(rows, targets: torch.Tensor, sums: _Sums) -> None:
    """Add the cross-entropy and top-1 hits of `rows` ((positions, logits) chunks, in order) against `targets`."""
    offset = 0
    for at, logits in rows:
        target = targets[offset : offset + at.numel()].to(logits.device)
        offset += at.numel()
        sums.nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        sums.correct += float((logits.argmax(-1) == target).sum())


class _Side:
    """One model on one batch: its inputs, its head (None: full logits) and its vocabulary."""

    def __init__(self, model, head, ids: torch.Tensor, mask: torch.Tensor, vocab: int):
        self.model, self.head, self.ids, self.mask, self.vocab = model, head, ids, mask, vocab

    def rows(self, index: torch.Tensor):
        return _rows(self.model, self.head, self.ids, self.mask, index, self.vocab)

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        parts = [x for _, x in self.rows(index)]
        return torch.cat(parts) if parts else torch.zeros(0, self.vocab, device=model_device(self.model))


@torch.no_grad()
def score_across(model, teacher, pair: TokenizerPair, examples, batch_size: int) -> tuple[_Sums, _Sums]:
    """(the model's sums, the teacher's sums) over `examples` (the model's tokenization), with the teacher on its
    own tokenization of the same text."""
    s_vocab, t_vocab = len(pair.student.pieces), len(pair.teacher.pieces)
    s_buckets, t_buckets, shared = pair.vocabulary_map
    buckets = BucketMap(torch.tensor(s_buckets), torch.tensor(t_buckets), shared)
    probe = examples[0].input_ids[:16]
    heads = (
        checked_head(model, torch.tensor([probe])),
        checked_head(teacher, torch.tensor([pair.align(probe).teacher_ids[:16] or [0]])),
    )
    pad = pad_id_of(pair.student.tokenizer)
    model_sums, teacher_sums = _Sums(), _Sums()
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        batch = collate(chunk, pad)
        alignments = [pair.align(e.input_ids, e.loss_mask) for e in chunk]
        tb = pair.batch_of(alignments, batch["input_ids"].shape[1])
        inputs = forward_inputs(batch)
        student = _Side(model, heads[0], inputs["input_ids"], inputs["attention_mask"], s_vocab)
        teacher_side = _Side(teacher, heads[1], tb["teacher_input_ids"], tb["teacher_attention_mask"], t_vocab)
        labels = batch["labels"].reshape(-1)  # (B·(T-1),)
        counted = (labels != -100).nonzero().squeeze(1)
        m = _Sums(tokens=float(counted.numel()), bytes=float(_student_bytes(pair, alignments, chunk)))
        _nll_and_correct(student.rows(counted), labels[counted], m)
        t_at, t_targets, t_bytes = _teacher_targets(pair, alignments, chunk, tb["teacher_input_ids"].shape[1])
        t = _Sums(tokens=float(t_at.numel()), bytes=float(t_bytes))
        _nll_and_correct(teacher_side.rows(t_at), t_targets, t)
        exact = tb["anchor_exact"]  # agreement and KL at the 1:1 spans
        m.aligned = float(exact.sum())
        if m.aligned:
            s_logits = student.logits(tb["anchor_student"][exact])
            t_logits = teacher_side.logits(tb["anchor_teacher"][exact]).to(s_logits.device)
            s_keys = [pair.student.key(i) for i in s_logits.argmax(-1).tolist()]
            t_keys = [pair.teacher.key(i) for i in t_logits.argmax(-1).tolist()]
            m.agree = float(sum(x == y and x is not None for x, y in zip(s_keys, t_keys, strict=True)))
            m.kl = float(aligned_divergence(s_logits, t_logits, buckets.to(s_logits.device), _KL).double().sum())
        model_sums.add(m)
        teacher_sums.add(t)
    return model_sums, teacher_sums


def _cost(model, spec, vocab: int, speed_settings, log) -> dict:
    result = {
        "params": count_parameters(model),
        "size_on_disk_bytes": size_on_disk(spec.path),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model_device(model)),
        "path": spec.path,
        "prefill_tokens_per_s": None,
        "decode_tokens_per_s": None,
    }
    if speed_settings is not None:
        log(f"timing {spec.name} ({result['device']}, {result['dtype']})")
        measured = measure_speed(model, vocab, speed_settings)
        batch_1 = measured["batches"][0]
        result.update(
            prefill_tokens_per_s=batch_1["prefill_tokens_per_s"],
            decode_tokens_per_s=batch_1["decode_tokens_per_s"],
            peak_memory_bytes=measured["peak_memory_bytes"],
            speed=measured,
        )
    return result


def _examples(data: str, tokenizer, max_length: int | None, max_rows: int | None):
    examples, stats = build_examples(data, tokenizer, max_length if max_length is not None else sys.maxsize)
    examples = examples[:max_rows] if max_rows is not None else examples
    if not examples:
        raise DistillError(f"eval data {data}: no examples with loss tokens ({stats.rows} rows read)")
    return examples


def evaluate_across_tokenizers(
    teacher_spec,
    specs,
    data: str,
    out_dir: str | None,
    *,
    max_length: int | None,
    batch_size: int,
    max_rows: int | None,
    speed_settings,
    log,
    metrics_path: str | None = None,
) -> dict:
    """The report (the report.json contract's keys, plus `aligned_share` and `teacher_bits_per_byte`) of the teacher
    and every model of `specs` (ModelSpec-like: name, path, dtype, device), each on its own tokenization of `data`;
    written into `out_dir` unless it is None.

    The teacher's own entry is its pass over its own tokenization; each model's `teacher_bits_per_byte` is the
    teacher's on exactly the bytes that model's counted tokens cover (its bits-per-byte retention divides the two)."""
    teacher_tokenizer = load_tokenizer(teacher_spec.path, "teacher")
    teacher = _load(teacher_spec)
    context = max_context(teacher.config)
    own = _examples(data, teacher_tokenizer, max_length, max_rows)
    log(f"eval teacher: {len(own)} sequences")
    teacher_sums, _ = score_across(  # the teacher on its own examples, as the one-tokenizer report counts them
        teacher, teacher, TokenizerPair(teacher_tokenizer, teacher_tokenizer), own, batch_size
    )
    teacher_result = {
        **teacher_sums.means(True),
        **_cost(teacher, teacher_spec, len(teacher_tokenizer), speed_settings, log),
    }
    results: dict[str, dict] = {}
    retention: dict[str, dict] = {}
    for spec in specs:
        tokenizer = load_tokenizer(spec.path, spec.name) if has_tokenizer(spec.path) else teacher_tokenizer
        examples = _examples(data, tokenizer, max_length, max_rows)
        model = _load(spec)
        log(f"eval {spec.name} across tokenizers: {len(examples)} sequences")
        model_sums, beside = score_across(
            model, teacher, TokenizerPair(tokenizer, teacher_tokenizer, context), examples, batch_size
        )
        result = {**model_sums.means(False), **_cost(model, spec, len(tokenizer), speed_settings, log)}
        result["teacher_bits_per_byte"] = beside.means(True)["bits_per_byte"]
        result.update(_NO_DRAFT)  # the one-tokenizer report's draft keys, so consumers see one schema
        results[spec.name] = result
        retention[spec.name] = {
            **retention_of(result, teacher_result),
            "cross_entropy": None,  # nats per token of another tokenizer: not comparable
            "top1_accuracy": None,
            "bits_per_byte": _ratio(result["teacher_bits_per_byte"], result["bits_per_byte"]),
        }
        del model
    report = {
        "models": {"teacher": teacher_result, **results},
        "retention": retention,
        "speedup": {name: speedup_of(r, teacher_result) for name, r in results.items()},
        "data": {
            "path": str(data),
            "sequences": len(own),
            "counted_tokens": teacher_result["tokens"],
            "counted_bytes": int(teacher_sums.bytes),
            "max_length": max_length,
            "cross_tokenizer": True,
        },
        "definitions": DEFINITIONS,
    }
    if out_dir is not None:
        from distill.report.render import write_report

        write_report(report, out_dir, metrics_path)
        log(f"report written to {out_dir}/report.html")
    return report


def _ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator
