"""Two tokenizations of one text (distill.data.alignment): byte spans, anchors, 1:1 spans, the shared vocabulary.

Hand-checked cases use tokenizers built from hand-written merges (their tokenizations are known exactly); the
property tests use two tokenizers trained on the same multilingual text (tests/helpers.py): a GPT-2-style byte-level
BPE without BOS and a Llama-2-style SentencePiece BPE with byte fallback, a dummy prefix and a BOS.
"""

from __future__ import annotations

import pytest

from distill.data import Example
from distill.data.alignment import _BYTE_DECODER, TokenizerPair, token_table
from distill.errors import DistillError
from helpers import MULTILINGUAL, byte_level_tokenizer, sentencepiece_tokenizer

_BYTE_ENCODER = {b: c for c, b in _BYTE_DECODER.items()}


def _byte_string(data: bytes) -> str:
    return "".join(_BYTE_ENCODER[b] for b in data)


def hand_byte_level(merges: list[tuple[bytes, bytes]]):
    """A byte-level BPE over all 256 bytes plus `merges` (byte strings), `<|pad|>` 0 and `<|eos|>` 1, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": 0, "<|eos|>": 1}
    for b in range(256):
        vocab[_byte_string(bytes([b]))] = len(vocab)
    pairs = []
    for a, b in merges:
        pairs.append((_byte_string(a), _byte_string(b)))
        vocab.setdefault(_byte_string(a + b), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|pad|>", "<|eos|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")


def hand_sentencepiece(alphabet: list[str], merges: list[tuple[str, str]]):
    """A SentencePiece-style BPE: <unk> <s> </s>, the 256 <0xNN> byte tokens, `alphabet`, then `merges`; ▁ spaces
    with a dummy prefix, byte fallback, <s> written before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TEXT = "héllo 你好😀!"  # bytes: h é(2) l l o ␠ 你(3) 好(3) 😀(4) ! = 18


@pytest.fixture(scope="module")
def hand_pair():
    student = hand_byte_level(
        [(b"l", b"l"), (b"ll", b"o"), (b" ", b"\xe4"), (b" \xe4", b"\xbd"), (b"\xe5", b"\xa5"), (b"\xf0", b"\x9f")]
        + [(b"\x98", b"\x80")]
    )
    teacher = hand_sentencepiece(["▁", "h", "é", "l", "o", "!", "好"], [("▁", "h"), ("é", "l"), ("l", "o")])
    return student, teacher


@pytest.fixture(scope="module")
def trained():
    return byte_level_tokenizer(), sentencepiece_tokenizer()


def test_hand_checked_spans_and_anchors(hand_pair):
    student, teacher = hand_pair
    ids = student(TEXT)["input_ids"] + [student.eos_token_id]
    assert student.convert_ids_to_tokens(ids) == (
        ["h", "Ã", "©", "llo", "Ġä½", "ł", "å¥", "½", "ðŁ", "ĺĢ", "!", "<|eos|>"]
    )  # é, 你, 好 and 😀 split inside the character
    a = TokenizerPair(student, teacher).align(ids)
    # The teacher starts with its own BOS (the student has none) and ends with its own EOS for the student's.
    assert teacher.convert_ids_to_tokens(a.teacher_ids) == (
        ["<s>", "▁h", "él", "lo", "▁", "<0xE4>", "<0xBD>", "<0xA0>", "好"]
        + ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "!", "</s>"]
    )
    assert a.student_spans == [(0, 1), (1, 2), (2, 3), (3, 6), (6, 9), (9, 10)] + [
        (10, 12),
        (12, 13),
        (13, 15),
        (15, 17),
        (17, 18),
        (18, 19),  # EOS: one unit after the text's 18 bytes
    ]
    # The dummy-prefix space of "▁h" is not text: "h" is byte 0 on both sides.
    assert a.teacher_spans[:5] == [(0, 0), (0, 1), (1, 4), (4, 6), (6, 7)]
    assert a.anchors == [
        (0, 1, False),  # student Ã (é's first byte) and teacher "él" after "h": a split group [1, 6)
        (3, 3, False),  # student " 你(2 bytes)" and teacher "▁" after "héllo"
        (4, 6, True),  # 你's last byte, <0xA0> on both sides
        (5, 7, False),  # student "好(2 bytes)" and teacher "好"
        (7, 8, False),  # 😀's first two bytes and the teacher's first byte of it
        (8, 10, False),  # 😀's last two bytes and the teacher's third byte
        (9, 12, True),  # "!"
        (10, 13, True),  # EOS and EOS
    ]
    assert a.targets == len(ids) - 1


def test_bos_asymmetry_the_other_way(hand_pair):
    """A student with BOS and a dummy prefix, a teacher without either: no anchor for the student's first token
    (the teacher has no position before its first token), and the student's BOS is not passed on."""
    teacher, student = hand_pair
    ids = student(TEXT)["input_ids"] + [student.eos_token_id]
    a = TokenizerPair(student, teacher).align(ids)
    assert teacher.convert_ids_to_tokens(a.teacher_ids)[0] == "h"  # no BOS, no space before the text
    assert a.student_spans[:3] == [(0, 0), (0, 1), (1, 4)]
    assert a.anchors[0] == (1, 0, False)  # "él" after "h" vs Ã: the student's "▁h" (target 1) has no anchor
    assert a.anchors[-1] == (13, 10, True)  # EOS


def test_loss_mask_limits_the_anchors(hand_pair):
    student, teacher = hand_pair
    ids = student(TEXT)["input_ids"]
    mask = [False] * 6 + [True] * (len(ids) - 6)  # a prompt of the first six tokens
    a = TokenizerPair(student, teacher).align(ids, mask)
    assert a.targets == len(ids) - 6
    assert [i for i, _, _ in a.anchors] == [5, 7, 8, 9]


def test_cut_inside_a_character_and_stray_bytes(hand_pair):
    """A sequence cut inside 😀 (max_length) or with a stray continuation byte: the teacher gets the valid text
    only, nothing crashes, and no anchor starts inside the bad bytes."""
    student, teacher = hand_pair
    pair = TokenizerPair(student, teacher)
    ids = student(TEXT)["input_ids"][:9]  # ... "ðŁ": half of 😀
    a = pair.align(ids)
    assert teacher.convert_ids_to_tokens(a.teacher_ids)[-1] == "好"
    assert all(i < 8 for i, _, _ in a.anchors)
    stray = (
        student("ab")["input_ids"] + student.convert_tokens_to_ids([_byte_string(b"\x80")]) + student("cd")["input_ids"]
    )
    a = pair.align(stray)
    covered = {b for start, end in a.teacher_spans for b in range(start, end)}
    assert covered == {0, 1, 3, 4}  # the teacher read "ab" and "cd", not the stray byte 2
    anchored = {i + 1 for i, _, _ in a.anchors}
    assert 2 not in anchored and 3 in anchored  # "c" after the stray byte still follows the same text offset


@pytest.mark.parametrize("direction", ["byte_level_student", "sentencepiece_student"])
def test_trained_tokenizers_tile_the_same_text(trained, direction):
    """On accents, CJK, emoji, leading spaces, tabs and code: each side's spans tile the original text, every
    anchor's two tokens start at the same byte, and a 1:1 span is the same bytes on both sides."""
    student, teacher = trained if direction == "byte_level_student" else trained[::-1]
    pair = TokenizerPair(student, teacher)
    seen_split = seen_one = 0
    for text in MULTILINGUAL:
        ids = list(student(text)["input_ids"]) + [student.eos_token_id]
        a = pair.align(ids)
        decoded = text.encode()
        # Both sides' pieces spell the original text: each token's span holds its piece (less a dummy-prefix space).
        # (The tokenizers' own decode is no reference: it drops a SentencePiece text's real leading space too.)
        for spans, table, seq in ((a.student_spans, pair.student, ids), (a.teacher_spans, pair.teacher, a.teacher_ids)):
            cursor = 0
            for (start, end), token in zip(spans, seq, strict=True):
                assert start == cursor, (text, spans)
                if token not in (table.bos_id, table.eos_id):  # a text token: its piece (less a dummy prefix)
                    piece = table.pieces[token]
                    assert decoded[start:end] in (piece, piece[1:]) and len(piece) - (end - start) in (0, 1)
                cursor = end
            assert cursor == len(decoded) + 1  # the text and the EOS unit
        for i, j, one_to_one in a.anchors:
            s_span, t_span = a.student_spans[i + 1], a.teacher_spans[j + 1]
            assert s_span[0] == t_span[0] and s_span[1] > s_span[0] and t_span[1] > t_span[0]
            assert one_to_one == (s_span == t_span)
            seen_one += one_to_one
            seen_split += not one_to_one
    assert seen_one and seen_split


def test_vocabulary_map_is_byte_level_aware(trained):
    student, teacher = trained
    pair = TokenizerPair(student, teacher)
    s_bucket, t_bucket, shared = pair.vocabulary_map
    byte_a = teacher.convert_tokens_to_ids("<0x61>")
    assert (
        t_bucket[byte_a] == t_bucket[teacher.convert_tokens_to_ids("a")] == s_bucket[student.convert_tokens_to_ids("a")]
    )
    assert s_bucket[student.convert_tokens_to_ids("Ġ")] == t_bucket[teacher.convert_tokens_to_ids("▁")] < shared
    assert s_bucket[student.eos_token_id] == t_bucket[teacher.eos_token_id] < shared  # markers by role
    assert t_bucket[teacher.bos_token_id] == shared  # the student has no BOS: the teacher's goes to the tail
    assert len(s_bucket) == len(student) and len(t_bucket) == len(teacher) and max(s_bucket) <= shared


def test_batch_indexes_the_flat_grids(trained):
    student, teacher = trained
    pair = TokenizerPair(student, teacher)
    examples = [Example(list(student(t)["input_ids"]), [True] * len(student(t)["input_ids"])) for t in MULTILINGUAL[:3]]
    width = max(len(e.input_ids) for e in examples)
    batch = pair.batch(examples, width)
    teacher_width = batch["teacher_input_ids"].shape[1]
    assert batch["teacher_attention_mask"].shape == batch["teacher_input_ids"].shape
    for row, e in enumerate(examples):
        a = pair.align(e.input_ids, e.loss_mask)
        assert batch["teacher_input_ids"][row, : len(a.teacher_ids)].tolist() == a.teacher_ids
        assert int(batch["teacher_attention_mask"][row].sum()) == len(a.teacher_ids)
    n = sum(len(pair.align(e.input_ids).anchors) for e in examples)
    assert batch["anchor_student"].shape == batch["anchor_teacher"].shape == batch["anchor_exact"].shape == (n,)
    assert int(batch["anchor_student"].max()) < len(examples) * (width - 1)
    assert int(batch["anchor_teacher"].max()) < len(examples) * (teacher_width - 1)


def test_a_normalizing_teacher_falls_back_to_offsets(trained):
    """A teacher whose pieces do not spell the text (a lowercasing normalizer): character offsets place its tokens,
    nothing is called 1:1, nothing crashes."""
    from tokenizers import normalizers

    student, _ = trained
    teacher = byte_level_tokenizer()
    teacher.backend_tokenizer.normalizer = normalizers.Lowercase()
    a = TokenizerPair(student, teacher).align(list(student("Héllo World")["input_ids"]))
    assert a.anchors and not any(one for _, _, one in a.anchors)


def test_teacher_max_tokens_cuts_its_sequence(trained):
    student, teacher = trained
    ids = list(student(MULTILINGUAL[2])["input_ids"])
    full = TokenizerPair(student, teacher).align(ids)
    cut = TokenizerPair(student, teacher, teacher_max_tokens=5).align(ids)
    assert len(cut.teacher_ids) == 5 and all(j + 1 < 5 for _, j, _ in cut.anchors)
    assert len(cut.anchors) < len(full.anchors)


def test_a_tokenizer_whose_strings_do_not_spell_text_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(DistillError, match="objective.cross_tokenizer: the student's vocabulary strings"):
        token_table(fast, "student")


def test_chat_rows_keep_their_markers(trained):
    """A chat row whose template writes BOS and EOS around every turn: against its own tokenizer the teacher's view
    is the row itself (every counted target 1:1); against the SentencePiece teacher the markers map by role and
    only the assistant turn (the counted targets) has anchors."""
    from conftest import train_tokenizer
    from distill.data import encode_row

    student = train_tokenizer()
    row = {"messages": [{"role": "user", "content": "héllo 你好"}, {"role": "assistant", "content": "the student 😀"}]}
    ids, mask = encode_row(row, student)
    itself = TokenizerPair(student, student).align(ids, mask)
    assert itself.teacher_ids == ids and len(itself.anchors) == itself.targets and all(e for *_, e in itself.anchors)
    teacher = trained[1]
    a = TokenizerPair(student, teacher).align(ids, mask)
    tokens = teacher.convert_ids_to_tokens(a.teacher_ids)
    assert tokens[0] == "<s>" and tokens.count("<s>") == 2 and tokens.count("</s>") == 2
    first_target = mask.index(True)
    assert {i + 1 for i, _, _ in a.anchors} <= set(range(first_target, len(ids)))
    assert a.anchors[-1][2] and tokens[a.anchors[-1][1] + 1] == "</s>"  # the turn's EOS and the teacher's, 1:1
