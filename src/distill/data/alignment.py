"""Two tokenizations of the same text side by side, for distilling across tokenizers (objective.cross_tokenizer).

A student example is a list of token ids; its text is what those tokens stand for. The teacher reads the same text
tokenized its own way, and both token lists are laid on one axis: UTF-8 byte offsets into that text. Bytes, not
characters: byte-level BPE splits a multi-byte character (é, 你, 😀) into pieces, and character offsets would give
every piece the whole character (the alignment bug of TRL #4393); on bytes each piece has a span of its own.

Terms used here and in `distill.losses.cross_tokenizer`:

- piece     the bytes a token stands for, read from its string in the vocabulary: byte-level BPE strings through
            GPT-2's byte alphabet (Ġ = space), SentencePiece strings with ▁ = space and <0xNN> byte-fallback tokens,
            added tokens (chat markers) as their content. `TokenTable` holds one per id.
- marker    BOS and EOS stand for no text; they are matched by role, not by string: the student's EOS and the
            teacher's EOS take the same one-unit span of the axis. A role one side lacks is zero-width there.
            The teacher's sequence starts the way its own tokenizer starts a text (its BOS, or nothing), whether
            or not the student's has a BOS (the BOS asymmetry of TRL #4393); a student BOS at the start becomes
            the teacher's BOS when it has one (a chat template that writes BOS itself).
- span      [start, end) of a token on the axis; SentencePiece's dummy-prefix space before a text is not part of
            the text (zero bytes), on either side.
- anchor    a counted student target and a teacher target that start at the same offset: both models predict them
            from the same text (the bytes before the offset), so the two distributions are comparable.
- 1:1 span  an anchor whose two tokens also end at the same offset: the same piece in both vocabularies.

Merges and splits: between two offsets where both tokenizations have a boundary lie n student and m teacher tokens.
n = m = 1 is a 1:1 span. Otherwise (one student token over several teacher tokens, or the reverse, or n:m) only the
first position of the group is an anchor: the student's distribution for its first token and the teacher's for its
first token follow the same text; the later positions inside the group follow text that ends inside the other
side's token, which no position of the other model has seen, so they get no teacher signal (the hard-label term
still counts them). Nothing is merged or renormalized across a group's tokens.

The teacher's text is checked against its own pieces: a piece list that does not spell the text (a normalizer, an
unknown token) falls back to the tokenizer's character offsets, made monotone; such anchors are never 1:1. Bytes
that are not valid UTF-8 (a sequence cut inside a character, a stray sampled byte) are not passed to the teacher.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property

import torch

from distill.errors import DistillError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Accents, CJK, an emoji (4 bytes), tabs, doubled spaces and a newline: a table that spells this spells text.
_PROBE = "Hello, wörld! naïve café 你好 😀\n\tx  = 1"
_ASCII_PROBE = "Hello, world!\n\tx  = 1"


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character standing for each byte -> that byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(kept)
    extra = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(kept, chars, strict=True)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _decoders(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [d for part in spec.get("decoders", []) for d in _decoders(part)]
    return [spec]


def _scheme(tokenizer_json: dict) -> tuple[str, str, bool]:
    """(how vocabulary strings spell bytes: byte_level | metaspace | plain, the space symbol, byte fallback)."""
    parts = _decoders(tokenizer_json.get("decoder"))
    byte_fallback = bool((tokenizer_json.get("model") or {}).get("byte_fallback")) or any(
        d.get("type") == "ByteFallback" for d in parts
    )
    for d in parts:
        if d.get("type") == "ByteLevel":
            return "byte_level", " ", False
        if d.get("type") == "Metaspace":
            return "metaspace", d.get("replacement", "▁"), byte_fallback
        if d.get("type") == "Replace" and d.get("content") == " ":
            return "metaspace", (d.get("pattern") or {}).get("String", "▁"), byte_fallback
    return "plain", " ", byte_fallback


def _piece(string: str, scheme: str, space: str, byte_fallback: bool) -> bytes:
    if scheme == "byte_level":
        try:
            return bytes(_BYTE_DECODER[c] for c in string)
        except KeyError:
            return string.encode("utf-8")
    if byte_fallback and (m := _BYTE_TOKEN.fullmatch(string)):
        return bytes([int(m.group(1), 16)])
    return (string.replace(space, " ") if scheme == "metaspace" else string).encode("utf-8")


@dataclass
class TokenTable:
    """What every id of one tokenizer stands for (see the module docstring for pieces and markers)."""

    tokenizer: object
    pieces: list[bytes | None]  # per id; None: a marker or an id that stands for nothing known (pad, unk)
    bos_id: int | None
    eos_id: int | None
    leading: tuple[int, ...]  # what the tokenizer writes before a text on its own (its BOS), maybe nothing
    prefix_space: bool  # it spells a text with a space before it (SentencePiece's dummy prefix)
    spells: bool = True  # its pieces spell the probe texts (else a teacher is placed by character offsets)

    def key(self, token_id: int):
        """What the id means across vocabularies: its piece, or the role of a marker; None for nothing shared."""
        if token_id == self.eos_id:
            return ("eos",)
        if token_id == self.bos_id:
            return ("bos",)
        piece = self.pieces[token_id]
        return piece if piece else None

    def prefix_of(self, ids: list[int], text: bytes) -> int | None:
        """How many bytes of dummy prefix (0 or 1) the pieces of `ids` put before `text`; None when they do not
        spell `text` (or one of them stands for nothing)."""
        pieces = [self.pieces[i] for i in ids]
        if any(p is None for p in pieces):
            return None
        joined = b"".join(pieces)
        if joined == text:
            return 0
        return 1 if self.prefix_space and joined == b" " + text else None


def token_table(tokenizer, role: str) -> TokenTable:
    """The `TokenTable` of a fast (tokenizer.json) tokenizer; `role` names it in errors.

    The student's pieces must spell text (they define the text the teacher reads); a teacher whose pieces do not
    (a normalizer, an unknown string scheme) is placed by its character offsets, never 1:1."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistillError(f"objective.cross_tokenizer: the {role}'s tokenizer is not a fast one (no tokenizer.json)")
    scheme, space, byte_fallback = _scheme(json.loads(backend.to_str()))
    size = len(tokenizer)
    strings: list[str | None] = [None] * size
    for string, i in tokenizer.get_vocab().items():
        if 0 <= i < size:
            strings[i] = string
    added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    pieces: list[bytes | None] = [
        added[i].encode("utf-8") if i in added else None if s is None else _piece(s, scheme, space, byte_fallback)
        for i, s in enumerate(strings)
    ]
    nothing = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    for i in nothing - {None}:
        if 0 <= i < size:
            pieces[i] = None
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])  # probes: what it adds around a text
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    start = next((s for s in range(len(full) - len(plain) + 1) if full[s : s + len(plain)] == plain), 0)
    table = TokenTable(
        tokenizer=tokenizer,
        pieces=pieces,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        leading=tuple(full[:start]),
        prefix_space=b"".join(p or b"" for p in (pieces[i] for i in plain)) == b" a",
    )
    table.spells = _spells(table)
    if not table.spells and role == "student":
        raise DistillError(
            f"objective.cross_tokenizer: the {role}'s vocabulary strings do not spell the text it tokenizes "
            f"({tokenizer.__class__.__name__}); byte-level BPE and SentencePiece-style tokenizers are supported"
        )
    return table


def _spells(table: TokenTable) -> bool:
    """Whether the table's pieces spell the probe text its tokenizer is given (the ASCII one, when the tokenizer
    has no bytes for some characters: an unknown token is not a wrong spelling)."""
    for probe in (_PROBE, _ASCII_PROBE):
        ids = list(table.tokenizer(probe, add_special_tokens=False)["input_ids"])
        if table.prefix_of(ids, probe.encode("utf-8")) is not None:
            return True
    return False


def _utf8_chunks(data: bytes) -> list[tuple[int, str]]:
    """(offset, text) of the runs of valid UTF-8 in `data`; invalid bytes between them are left out."""
    chunks, start = [], 0
    while start < len(data):
        try:
            chunks.append((start, data[start:].decode("utf-8")))
            break
        except UnicodeDecodeError as e:
            if e.start:
                chunks.append((start, data[start : start + e.start].decode("utf-8")))
            start += e.start + max(1, e.end - e.start)
    return chunks


@dataclass
class Alignment:
    """One student sequence and the teacher's tokenization of its text, on the byte axis of the module docstring."""

    teacher_ids: list[int]
    student_spans: list[tuple[int, int]]
    teacher_spans: list[tuple[int, int]]
    teacher_exact: list[bool]  # the span comes from the teacher's own pieces (False: from character offsets)
    anchors: list[tuple[int, int, bool]] = field(default_factory=list)  # (student pos, teacher pos, 1:1)
    targets: int = 0  # counted student targets (what the anchors are a share of)


class TokenizerPair:
    """The student's and the teacher's tokenizers: per-example alignments, batches, the shared vocabulary.

    `teacher_max_tokens` cuts the teacher's sequences (its context length); anchors beyond are dropped.
    """

    def __init__(self, student_tokenizer, teacher_tokenizer, teacher_max_tokens: int | None = None):
        self.student = token_table(student_tokenizer, "student")
        self.teacher = token_table(teacher_tokenizer, "teacher")
        self.teacher_max_tokens = teacher_max_tokens
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad_id = pad if pad is not None else (self.teacher.eos_id or 0)

    # ---------------------------------------------------------------- one sequence

    def align(self, ids: list[int], loss_mask: list[bool] | None = None) -> Alignment:
        """The teacher's view of the student sequence `ids` and the anchors among its counted targets."""
        s, t = self.student, self.teacher
        # The teacher starts as its tokenizer starts a text, or with its own BOS where the student starts with one.
        bos_first = bool(ids) and ids[0] == s.bos_id and s.pieces[ids[0]] is None and t.bos_id is not None
        first = [t.bos_id] if bos_first else list(t.leading)
        out = Alignment(first, [(0, 0)] * len(ids), [(0, 0)] * len(first), [True] * len(first))
        offset, k = 0, 0
        while k < len(ids):
            token = ids[k]
            if s.pieces[token] is not None:  # a run of text tokens up to the next marker
                end = k
                while end < len(ids) and s.pieces[ids[end]] is not None:
                    end += 1
                offset = self._text_run(ids, k, end, offset, out)
                k = end
                continue
            role = "eos" if token == s.eos_id else "bos" if token == s.bos_id and k > 0 else None
            teacher_id = {"eos": t.eos_id, "bos": t.bos_id}.get(role) if role else None
            if teacher_id is not None:  # one unit of the axis on both sides
                out.student_spans[k] = (offset, offset + 1)
                out.teacher_ids.append(teacher_id)
                out.teacher_spans.append((offset, offset + 1))
                out.teacher_exact.append(True)
                offset += 1
            else:  # the student's own BOS, a role the teacher lacks, pad or unk: zero-width, nothing passed on
                out.student_spans[k] = (offset, offset)
            k += 1
        if self.teacher_max_tokens is not None and len(out.teacher_ids) > self.teacher_max_tokens:
            cut = self.teacher_max_tokens
            out.teacher_ids, out.teacher_spans = out.teacher_ids[:cut], out.teacher_spans[:cut]
            out.teacher_exact = out.teacher_exact[:cut]
        self._anchors(out, loss_mask)
        return out

    def _text_run(self, ids: list[int], first: int, end: int, offset: int, out: Alignment) -> int:
        """Place student tokens ids[first:end] (all text) from `offset` and the teacher's tokens of their text;
        returns the offset after them."""
        pieces = [self.student.pieces[i] for i in ids[first:end]]
        if self._dummy_prefix(ids[first], b"".join(pieces)):  # the dummy prefix is not text
            j = next(j for j, piece in enumerate(pieces) if piece)
            pieces[j] = pieces[j][1:]
        cursor = offset
        for k, piece in zip(range(first, end), pieces, strict=True):
            out.student_spans[k] = (cursor, cursor + len(piece))
            cursor += len(piece)
        for start, text in _utf8_chunks(b"".join(pieces)):
            self._teacher_tokens(text, offset + start, out)
        return cursor

    def _dummy_prefix(self, first_id: int, run: bytes) -> bool:
        """Whether the space a run's first student piece starts with is SentencePiece's dummy prefix: its tokenizer
        writes the same first token for the text without that space (a real leading space, "  x" -> "▁", "▁x",
        would give another)."""
        if not (self.student.prefix_space and run.startswith(b" ")):
            return False
        text = run[1:65].decode("utf-8", errors="ignore")
        return list(self.student.tokenizer(text, add_special_tokens=False)["input_ids"][:1]) == [first_id]

    def _teacher_tokens(self, text: str, offset: int, out: Alignment) -> None:
        """Append the teacher's tokens of `text`, placed from `offset`."""
        t = self.teacher
        encoded = t.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        prefix = t.prefix_of(ids, text.encode("utf-8"))
        if prefix is not None:
            lengths = [len(t.pieces[i]) for i in ids]
            if prefix:  # the dummy prefix is not text: the first non-empty piece loses its space
                lengths[next(j for j, n in enumerate(lengths) if n)] -= 1
            cursor = offset
            for length in lengths:
                out.teacher_spans.append((cursor, cursor + length))
                cursor += length
            exact = True
        else:  # the pieces do not spell the text: character offsets, monotone, never 1:1
            to_byte = [0]
            for ch in text:
                to_byte.append(to_byte[-1] + len(ch.encode("utf-8")))
            cursor = offset
            for a, b in encoded["offset_mapping"]:
                start, stop = max(offset + to_byte[a], cursor), max(offset + to_byte[b], cursor)
                out.teacher_spans.append((start, stop))
                cursor = stop
            exact = False
        out.teacher_ids.extend(ids)
        out.teacher_exact.extend([exact] * len(ids))

    @staticmethod
    def _anchors(out: Alignment, loss_mask: list[bool] | None) -> None:
        starts = {}
        for m in range(1, len(out.teacher_ids)):  # the teacher's token 0 has no position predicting it
            a, b = out.teacher_spans[m]
            if b > a:
                starts[a] = m
        for k in range(1, len(out.student_spans)):
            if loss_mask is not None and not loss_mask[k]:
                continue
            out.targets += 1
            a, b = out.student_spans[k]
            m = starts.get(a) if b > a else None
            if m is not None:
                exact = out.teacher_spans[m][1] == b and out.teacher_exact[m]
                out.anchors.append((k - 1, m - 1, exact))

    # ---------------------------------------------------------------- batches

    def batch(self, examples, width: int) -> dict[str, torch.Tensor]:
        """The teacher's inputs and the anchors of a micro-batch whose student side is `width` tokens wide.

        teacher_input_ids, teacher_attention_mask (B, T_t); anchor_student (N,) flat positions of the (B, width-1)
        output grid; anchor_teacher (N,) flat positions of the teacher's (B, T_t-1) grid; anchor_exact (N,) bool.
        """
        return self.batch_of([self.align(e.input_ids, e.loss_mask) for e in examples], width)

    def batch_of(self, alignments: list[Alignment], width: int) -> dict[str, torch.Tensor]:
        """`batch` from alignments already made (one per example, in order)."""
        teacher_width = max(1, *(len(a.teacher_ids) for a in alignments))
        ids = torch.full((len(alignments), teacher_width), self.teacher_pad_id, dtype=torch.long)  # (B, T_t)
        mask = torch.zeros((len(alignments), teacher_width), dtype=torch.long)  # (B, T_t)
        student_at, teacher_at, exact = [], [], []
        for row, a in enumerate(alignments):
            n = max(1, len(a.teacher_ids))  # an empty row keeps one pad token visible: no fully masked row
            ids[row, : len(a.teacher_ids)] = torch.tensor(a.teacher_ids, dtype=torch.long)
            mask[row, :n] = 1
            for i, j, one_to_one in a.anchors:
                student_at.append(row * (width - 1) + i)
                teacher_at.append(row * (teacher_width - 1) + j)
                exact.append(one_to_one)
        return {
            "teacher_input_ids": ids,
            "teacher_attention_mask": mask,
            "anchor_student": torch.tensor(student_at, dtype=torch.long),
            "anchor_teacher": torch.tensor(teacher_at, dtype=torch.long),
            "anchor_exact": torch.tensor(exact, dtype=torch.bool),
        }

    def stats(self, examples) -> dict[str, float]:
        """Shares of counted targets that are anchors and 1:1 spans, over `examples`."""
        targets = anchors = exact = 0
        for e in examples:
            a = self.align(e.input_ids, e.loss_mask)
            targets += a.targets
            anchors += len(a.anchors)
            exact += sum(one for _, _, one in a.anchors)
        return {"targets": targets, "anchored": anchors / max(targets, 1), "one_to_one": exact / max(targets, 1)}

    # ---------------------------------------------------------------- vocabularies

    @cached_property
    def vocabulary_map(self) -> tuple[list[int], list[int], int]:
        """(student bucket per id, teacher bucket per id, number of shared buckets): a bucket is a piece (or a
        marker role) present in both vocabularies; ids sharing a piece share its bucket; the rest go to the tail
        bucket, numbered last (= the number of shared buckets)."""
        s_keys = [self.student.key(i) for i in range(len(self.student.pieces))]
        t_keys = [self.teacher.key(i) for i in range(len(self.teacher.pieces))]
        shared = set(s_keys) & set(t_keys)
        shared.discard(None)
        index: dict = {}
        for key in t_keys:  # numbered in the teacher's id order: deterministic
            if key in shared and key not in index:
                index[key] = len(index)
        tail = len(index)
        return [index.get(k, tail) for k in s_keys], [index.get(k, tail) for k in t_keys], tail
