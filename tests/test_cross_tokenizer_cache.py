"""Distilling across tokenizers from a cache (distill.cache.cross): the top-k loss math against the online one,
`distill cache` + `distill train` end to end, equality with the online teacher when the cache keeps the whole
vocabulary (values and gradients), and the refusals of a cache that does not match."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import llama_config, qwen2_config, save_model, write_jsonl
from distill.cli import main
from distill.losses.cross_tokenizer import (
    BucketMap,
    cross_tokenizer_divergence,
    top_k_cross_divergence,
    uld_distance,
)
from distill.losses.objective import Objective
from distill.losses.sparse import tail_half_mass
from helpers import MULTILINGUAL, byte_level_tokenizer, recipe_dict, sentencepiece_tokenizer, write_recipe


def top_k_of(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """What a cache stores of a teacher row: top-k ids and log-probs, log rest, log Σ √p of the rest."""
    lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    top_lp, top_ids = lp.topk(k, dim=-1)
    tail = lp.scatter(-1, top_ids, float("-inf"))
    return top_ids, top_lp, tail.logsumexp(-1), tail_half_mass(tail)


@pytest.mark.parametrize("sizes", [(10, 12), (14, 9)])
@pytest.mark.parametrize("divergence, temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0)])
@pytest.mark.parametrize("mode", ["uld", "aligned"])
def test_full_vocabulary_top_k_is_the_online_loss(sizes, divergence, temperature, mode):
    """With k = the teacher's vocabulary the cached form is the online divergence, values and gradients."""
    v_s, v_t = sizes
    torch.manual_seed(0)
    student = torch.randn(7, v_s, requires_grad=True)
    teacher = torch.randn(7, v_t) * 2
    # Six shared pieces (a teacher id 0 and a teacher id v_t-1 share bucket 0), the rest are each side's tail.
    buckets = BucketMap(
        torch.tensor([0, 1, 2, 3, 4, 5] + [6] * (v_s - 6)), torch.tensor([0, 1, 2, 3, 4, 5] + [6] * (v_t - 7) + [0]), 6
    )
    exact = torch.tensor([True, False, True, True, False, True, True])
    o = Objective(divergence, temperature=temperature)
    online = cross_tokenizer_divergence(student, teacher, exact, o, mode, buckets)
    (g_online,) = torch.autograd.grad(online.sum(), student)
    cached = top_k_cross_divergence(student, top_k_of(teacher, v_t), exact, o, mode, buckets, v_t)
    (g_cached,) = torch.autograd.grad(cached.sum(), student)
    assert cached.shape == (7,)
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_cached, g_online, rtol=1e-5, atol=1e-6)


def test_top_k_uld_is_a_lower_bound_and_hand_computed():
    """ULD from a top-k: the k largest of each side, then |rest_s − rest_t|; never above the exact ULD."""
    student = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    teacher = torch.log(torch.tensor([[0.1, 0.6, 0.2, 0.1]]))
    # k = 1: |0.5 − 0.6| + |(0.3 + 0.2) − (0.2 + 0.1 + 0.1)| = 0.1 + 0.1
    cached = top_k_cross_divergence(student, top_k_of(teacher, 1), torch.tensor([False]), Objective(), "uld", None, 4)
    assert cached.item() == pytest.approx(0.2, abs=1e-6)
    # exact: |0.5−0.6| + |0.3−0.2| + |0.2−0.1| + |0−0.1| = 0.4
    assert uld_distance(student, teacher).item() == pytest.approx(0.4, abs=1e-6)
    torch.manual_seed(1)
    s, t = torch.randn(50, 30), torch.randn(50, 40) * 3
    for k in (1, 4, 16):
        bound = top_k_cross_divergence(
            s, top_k_of(t, k), torch.zeros(50, dtype=torch.bool), Objective(), "uld", None, 40
        )
        assert bool((bound <= uld_distance(s, t) + 1e-6).all())


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """The pair of tests/test_cross_tokenizer.py: a Llama teacher with a SentencePiece tokenizer (BOS, byte
    fallback) and a Qwen2 student with a byte-level BPE, trained on the same text; that text as training rows."""
    root = tmp_path_factory.mktemp("xcache")
    s_tok, t_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    teacher = save_model(llama_config(len(t_tok), hidden=64), t_tok, root / "teacher", seed=1)
    student = save_model(qwen2_config(len(s_tok) + 8, hidden=32), s_tok, root / "student", seed=2)
    rows = [{"text": MULTILINGUAL[i % len(MULTILINGUAL)] + f" {i}"} for i in range(24)]
    rows += [{"prompt": "héllo", "completion": " wörld 😀"}] * 4
    return teacher, student, write_jsonl(root / "train.jsonl", rows)


def cross_recipe(tmp_path, pair_dirs, mode="uld", fused=False, **sections):
    teacher, student, train = pair_dirs
    content = recipe_dict(
        teacher,
        student,
        train,
        tmp_path / "run",
        objective={"cross_tokenizer": mode, "fused": fused, "ce_weight": 0.0},
        cache={"dir": str(tmp_path / "cache"), "top_k": 4, "shard_tokens": 200, "batch_size": 3},
    )
    for section, values in sections.items():
        content.setdefault(section, {}).update(values)
    return content


@pytest.mark.parametrize("mode, fused", [("uld", False), pytest.param("aligned", True, marks=pytest.mark.slow)])
def test_distill_cache_then_train_across_tokenizers(tmp_path, pair_dirs, mode, fused):
    """`distill cache` on a cross-tokenizer recipe, then `distill train` from it without the teacher model: the
    divergence is logged, finite and positive; the student's weights change; a resumed run ends bitwise equal."""
    from helpers import final_weights

    content = cross_recipe(tmp_path, pair_dirs, mode, fused)
    recipe = write_recipe(tmp_path / "r.yaml", content)
    assert main(["cache", str(recipe), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["cross_tokenizer"]["teacher_tokens"] > 0 and manifest["data"]["loss_tokens"] > 0
    assert len(manifest["shards"]) > 1  # shards end at example boundaries; the reader finds rows across them
    assert main(["cache", str(recipe), "--quiet"]) == 0  # complete: left as it is
    assert main(["cache", "verify", str(tmp_path / "cache")]) == 0  # every shard's sha256 as recorded
    content["teacher"] = {"cache": str(tmp_path / "cache")}  # no teacher model: its tokenizer from the cache
    trained = write_recipe(tmp_path / "t.yaml", content)
    assert main(["train", str(trained), "--quiet"]) == 0
    out = tmp_path / "run"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [e["kd_loss"] for e in events if e["event"] == "train"]
    assert len(kd) == 4 and all(0 < v < 10 for v in kd)
    # Exact resume: a run killed right after its step-2 checkpoint, that checkpoint alone in a fresh run folder.
    cut = tmp_path / "cut"
    shutil.copytree(out / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    assert main(["train", str(trained), "--quiet", "--resume", f"output.dir={cut}"]) == 0
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) == 3  # it did resume
    whole, resumed = final_weights(out), final_weights(cut)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("mode, fused", [("uld", False), ("aligned", False), ("aligned", True)])
def test_cache_with_the_whole_vocabulary_equals_the_online_teacher(tmp_path, pair_dirs, mode, fused):
    """top_k = the teacher's vocabulary, float32: the loss and the student's gradients of a micro-batch from the
    cache equal those of the online teacher (up to float rounding of differently padded teacher batches)."""
    from distill.cache.cross import CrossCacheReader
    from distill.cache.reader import read_manifest
    from distill.config import recipe_from_dict
    from distill.data import collate, load_data
    from distill.data.alignment import TokenizerPair
    from distill.losses.cross_tokenizer import TopKCrossTargets
    from distill.losses.heads import output_head
    from distill.models import load_model, load_tokenizer
    from distill.train.cross import cross_objective, teacher_targets
    from distill.train.step import StudentLoss

    teacher_dir, student_dir, _ = pair_dirs
    content = cross_recipe(tmp_path, pair_dirs, mode, fused)
    content["cache"].update(top_k=100_000, precision="float32", pack_ids=False)
    content["teacher"]["dtype"] = "float32"  # compared with the fp32 online teacher below
    assert main(["cache", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 0
    recipe = recipe_from_dict(content)
    s_tok, t_tok = load_tokenizer(str(student_dir), "student"), load_tokenizer(str(teacher_dir), "teacher")
    examples = load_data(recipe, s_tok, lambda _: None)[0]
    pair = TokenizerPair(s_tok, t_tok)
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    reader = CrossCacheReader(tmp_path / "cache", read_manifest(tmp_path / "cache"))
    assert reader.k == len(t_tok)
    indices = [0, 5, 17, len(examples) - 1]  # the last is a prompt/completion row
    chosen = [examples[i] for i in indices]
    batch = collate(chosen, s_tok.pad_token_id)
    batch.update(pair.batch(chosen, batch["input_ids"].shape[1]))
    online = teacher_targets(teacher, batch, fused, torch.device("cpu"))
    rows = reader.anchor_rows(indices, batch)
    cached = TopKCrossTargets(batch["anchor_student"], batch["anchor_exact"], *rows.values())
    assert bool(batch["anchor_exact"].any()) and not bool(batch["anchor_exact"].all())

    def loss_and_grads(targets):
        student = load_model(str(student_dir), "student", torch.float32)
        module = StudentLoss(
            student,
            recipe.objective,
            len(s_tok),
            output_head(teacher) if fused else None,
            cross=cross_objective(pair, mode, torch.device("cpu")),
        )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        loss, kd_sum, _, _ = module(inputs, batch["labels"], 10.0, cross=targets)
        loss.backward()
        return kd_sum, {n: p.grad for n, p in student.named_parameters() if p.grad is not None}

    kd_online, g_online = loss_and_grads(online)
    kd_cached, g_cached = loss_and_grads(cached)
    assert kd_online > 0
    torch.testing.assert_close(kd_cached, kd_online, rtol=1e-4, atol=1e-5)
    assert g_online.keys() == g_cached.keys()
    for name in g_online:
        torch.testing.assert_close(g_cached[name], g_online[name], rtol=1e-3, atol=1e-6)


def test_a_cache_that_does_not_match_is_refused(tmp_path, pair_dirs, capsys):
    """Other text (same number of rows) or another teacher tokenizer: one line naming the mismatch, exit 2."""
    teacher_dir, student_dir, train = pair_dirs
    content = cross_recipe(tmp_path, pair_dirs)
    assert main(["cache", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[0] = {"text": "completely other words here"}  # example 0 of the training split
    other_text = {**content, "data": {**content["data"], "train": str(write_jsonl(tmp_path / "other.jsonl", rows))}}
    other_text["teacher"] = {"path": str(teacher_dir), "cache": str(tmp_path / "cache")}
    assert main(["train", str(write_recipe(tmp_path / "o.yaml", other_text)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "differs from the cache's at teacher token" in err and len(err.splitlines()) == 1

    tok = sentencepiece_tokenizer(merges=60)  # another teacher tokenizer (the teacher weights are the same size)
    other = save_model(llama_config(len(tok), hidden=64), tok, tmp_path / "other_teacher", seed=1)
    other_teacher = {**content, "teacher": {"path": str(other), "cache": str(tmp_path / "cache")}}
    assert main(["train", str(write_recipe(tmp_path / "t.yaml", other_teacher)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different teacher tokenizer" in err and len(err.splitlines()) == 1

    one_tokenizer = {**content, "objective": {"cross_tokenizer": "off"}, "teacher": {"cache": str(tmp_path / "cache")}}
    assert main(["train", str(write_recipe(tmp_path / "f.yaml", one_tokenizer)), "--quiet"]) == 2
    err = capsys.readouterr().err  # the student's own tokenizer is not the cache's (the teacher's)
    assert "tokenizers differ" in err or "built across tokenizers" in err


# ---------------------------------------------------------------- the report across tokenizers


def test_report_across_tokenizers_has_the_draft_keys_and_shows_the_byte_columns(tmp_path, pair_dirs):
    """The draft keys are there, null, with a note (one schema for report consumers); report.md and report.html
    show each model's 1:1 share and the teacher's bits per byte on the same bytes."""
    from distill.report.evaluate import evaluate_models

    teacher, student, train = pair_dirs
    out = tmp_path / "report"
    quiet = {"speed": False, "show_progress": False, "log": lambda _: None}
    evaluate_models(str(teacher), {"student": str(student)}, str(train), str(out), cross_tokenizer=True, **quiet)
    report = json.loads((out / "report.json").read_text())
    s = report["models"]["student"]
    assert s["draft_acceptance_rate"] is None and s["speculative_decode_speedup"] is None
    assert "different tokenizers" in s["draft_note"]
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (markdown, page):
        assert "1:1 share" in text and "teacher bits/byte, same bytes" in text
        assert f"{s['aligned_share']:.2%}" in text and f"{s['teacher_bits_per_byte']:.4g}" in text
        assert "not measured: the model and the teacher have different tokenizers" in text


@pytest.mark.parametrize(
    "cache, key",
    [({"representation": "sampled"}, "cache.representation"), ({"tail_samples": 4}, "cache.tail_samples")],
)
def test_what_a_cross_tokenizer_cache_cannot_store_is_refused(tmp_path, pair_dirs, capsys, cache, key):
    content = cross_recipe(tmp_path, pair_dirs)
    content["cache"].update(cache)
    assert main(["cache", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"recipe key {key}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_one_cache_serves_another_student_tokenizer_of_the_same_text(tmp_path, pair_dirs):
    """The cache holds the teacher's view of the text: a student with another vocabulary (untruncated rows) finds
    its anchors' rows there, and they are the teacher's own rows at those positions."""
    from distill.cache.cross import CrossCacheReader, open_cross_cache
    from distill.config import recipe_from_dict
    from distill.data import collate, load_data, pad_id_of
    from distill.data.alignment import TokenizerPair
    from distill.models import load_tokenizer

    teacher_dir, _, _ = pair_dirs
    content = cross_recipe(tmp_path, pair_dirs)
    content["cache"].update(precision="float32", pack_ids=False)
    assert main(["cache", str(write_recipe(tmp_path / "r.yaml", content)), "--quiet"]) == 0
    other = byte_level_tokenizer(vocab_size=420)  # another student vocabulary, the same text
    other.save_pretrained(tmp_path / "other-student")
    content["student"]["tokenizer"] = str(tmp_path / "other-student")
    content["teacher"]["cache"] = str(tmp_path / "cache")
    recipe = recipe_from_dict(content)
    s_tok, t_tok = load_tokenizer(str(tmp_path / "other-student"), "student"), load_tokenizer(str(teacher_dir), "t")
    examples = load_data(recipe, s_tok, lambda _: None)[0]
    pair = TokenizerPair(s_tok, t_tok)
    reader = open_cross_cache(recipe, pair, examples)  # every one of the first 64 examples checked
    assert isinstance(reader, CrossCacheReader)
    indices = list(range(len(examples)))
    batch = collate(examples, pad_id_of(s_tok))
    batch.update(pair.batch(examples, batch["input_ids"].shape[1]))
    rows = reader.anchor_rows(indices, batch)
    assert rows["cached_ids"].shape == (len(batch["anchor_student"]), 4)
    # The cache's rows at the first example's anchors are those the cache stored for its teacher positions.
    shard, first_row, _ = reader._locate(0)
    first = batch["anchor_teacher"] < batch["teacher_input_ids"].shape[1] - 1  # row 0 of the (B, T_t-1) grid
    expected = reader._shard(shard)["ids"][first_row + batch["anchor_teacher"][first].numpy()]
    assert torch.equal(rows["cached_ids"][first], torch.from_numpy(expected.astype("int64")))
