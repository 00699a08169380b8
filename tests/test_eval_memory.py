"""Memory-lean evaluation: metrics from hidden states a chunk of tokens at a time equal the dense reference, no
(tokens × vocabulary) tensor is ever built, architectures the head cannot reproduce fall back to full logits, a
run frees training's memory before its report, and `distill eval` keeps pre-tokenized rows whole."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import llama_config, save_model, write_jsonl
from distill.data import collate, forward_inputs
from distill.losses.token_metrics import chunk_metrics, chunked_token_metrics, dense_rows
from distill.report.evaluate import evaluate_models
from distill.report.quality import TokenSums, checked_head, evaluate_batches, logit_rows, token_metrics, token_sums

RTOL = 1e-5
TINY_BUDGET = 1  # the smallest chunk (8 tokens): many chunks per batch, so chunk boundaries are exercised

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
VOCAB = 90  # the "tokenizer's" vocabulary; models below have more embedding rows (padded vocabularies)


def _configs():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    return {
        "llama_padded": LlamaConfig(**COMMON, vocab_size=VOCAB + 6),
        "llama_tied": LlamaConfig(**COMMON, vocab_size=VOCAB, tie_word_embeddings=True),
        "gemma2_softcap_tied_padded": Gemma2Config(**COMMON, vocab_size=VOCAB + 10, final_logit_softcapping=3.0),
        "cohere_logit_scale": CohereConfig(**COMMON, vocab_size=VOCAB + 2, logit_scale=0.4),
        "granite_logits_scaling": GraniteConfig(**COMMON, vocab_size=VOCAB, logits_scaling=2.5),
    }


def _model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random heads near zero would make every distribution nearly uniform
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _batches(seed: int = 0, rows: int = 5, count: int = 2):
    """Right-padded batches with prompt (masked) tokens: exclusion and chunk boundaries both matter."""
    from distill.data import Example

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        examples = []
        for _ in range(rows):
            n = int(torch.randint(6, 30, (1,), generator=g))
            ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
            prompt = int(torch.randint(0, 4, (1,), generator=g))
            examples.append(Example(ids, [False] * prompt + [True] * (n - prompt)))
        batches.append(collate(examples, 0))
    return batches


def _dense_logits(model, batch) -> torch.Tensor:
    return model(**forward_inputs(batch)).logits[:, :-1, :VOCAB]  # (B, T-1, V)


def _rel(got: float, ref: float) -> float:
    return abs(got - ref) / max(abs(ref), 1e-12)


@pytest.mark.parametrize("name", list(_configs()))
def test_chunked_evaluation_equals_dense_reference(name):
    config = _configs()[name]
    student, teacher = _model(config, 1), _model(config, 2)
    batches = _batches(count=1)  # sums over several batches: see the fallback test
    assert checked_head(student, batches[0]["input_ids"][:1]) is not None  # the lean path is the one tested
    got = evaluate_batches(student, teacher, batches, VOCAB, torch.device("cpu"), memory_budget_bytes=TINY_BUDGET)

    reference = TokenSums()
    with torch.no_grad():
        for batch in batches:
            reference.add(token_sums(_dense_logits(student, batch), batch["labels"], _dense_logits(teacher, batch)))
            # Per token too: the report's path keeps every token's values, not only their sums.
            inputs = forward_inputs(batch)
            lean = chunked_token_metrics(
                logit_rows(student, checked_head(student, batch["input_ids"][:1]), inputs, VOCAB),
                batch["labels"].reshape(-1),
                logit_rows(teacher, checked_head(teacher, batch["input_ids"][:1]), inputs, VOCAB),
                vocab_size=VOCAB,
                chunk_rows=8,
            )
            dense = token_metrics(_dense_logits(student, batch), batch["labels"], _dense_logits(teacher, batch))
            assert lean["index"].tolist() == dense["index"].tolist()
            for key in ("cross_entropy", "kl_to_teacher", "teacher_cross_entropy"):
                assert torch.allclose(lean[key], dense[key], rtol=RTOL, atol=1e-6), key
            for key in ("prediction", "teacher_prediction", "correct", "agreement"):
                assert lean[key].tolist() == dense[key].tolist(), key
    ref = reference.means()
    assert got["tokens"] == ref["tokens"] > 0
    for key in ("cross_entropy", "kl_to_teacher", "top1_accuracy", "agreement"):
        assert _rel(got[key], ref[key]) <= RTOL, (key, got[key], ref[key])
    assert ref["kl_to_teacher"] > 0.01  # different models: a KL that could be wrong


def test_chunk_metrics_by_hand():
    # Two tokens, vocabulary 3: every value written out from the definitions.
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0])
    m = chunk_metrics(logits, labels, teacher)
    z = 2.0 + torch.e**2  # partition function of the second row
    expected_ce = torch.tensor([torch.log(torch.tensor(3.0)), torch.log(torch.tensor(z)) - 2.0])
    assert torch.allclose(m["cross_entropy"], expected_ce)
    # KL(uniform ‖ softmax([2, 0, 0])) = Σ (1/3)(log(1/3) − log p_i)
    log_p = torch.tensor([2.0, 0.0, 0.0]) - torch.log(torch.tensor(z))
    expected_kl = float((torch.log(torch.tensor(1 / 3)) - log_p).mean())
    assert m["kl_to_teacher"][0] == pytest.approx(0.0, abs=1e-7)
    assert m["kl_to_teacher"][1] == pytest.approx(expected_kl, rel=1e-6)
    assert m["prediction"].tolist()[1] == 0
    assert torch.allclose(m["teacher_cross_entropy"], torch.log(torch.tensor([3.0, 3.0])))


def test_identical_models_give_zero_kl_and_full_agreement():
    model = _model(_configs()["llama_padded"], 3)
    got = evaluate_batches(model, model, _batches(1), VOCAB, torch.device("cpu"), memory_budget_bytes=TINY_BUDGET)
    assert got["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and got["agreement"] == 1.0


class _LargestVocabularyRows(TorchDispatchMode):
    """Records the most rows of any newly allocated tensor whose last dimension spans the vocabulary.

    A (B, T, V) logits tensor counts B·T rows; a chunk of n tokens' logits counts n. Views (which share their
    input's storage: slices, transposes of the weight) are not allocations and are skipped."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            spans_vocabulary = isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] >= self.vocab
            if spans_vocabulary and t.numel() and t.untyped_storage().data_ptr() not in inputs:
                self.rows = max(self.rows, t.numel() // t.shape[-1])
        return out


def test_periodic_evaluation_never_builds_token_by_vocabulary_logits():
    config = _configs()["llama_padded"]
    student, teacher = _model(config, 1), _model(config, 2)
    batches = _batches(rows=6, count=1)
    tokens = batches[0]["labels"].numel()
    # The dispatch mode sees everything, including the head check's forward on a few tokens (16 at most).
    with _LargestVocabularyRows(VOCAB) as seen:
        evaluate_batches(student, teacher, batches, VOCAB, torch.device("cpu"), memory_budget_bytes=TINY_BUDGET)
    assert 8 <= seen.rows <= 16 < tokens // 4, (seen.rows, tokens)


def test_report_evaluation_never_builds_token_by_vocabulary_logits(tmp_path, tokenizer):
    vocab = len(tokenizer)
    teacher = save_model(llama_config(vocab + 16, hidden=32, layers=1), tokenizer, tmp_path / "teacher", seed=1)
    student = save_model(llama_config(vocab, hidden=16, layers=1), None, tmp_path / "student", seed=2)
    rows = [
        {"input_ids": torch.randint(3, vocab, (60,), generator=torch.Generator().manual_seed(i)).tolist()}
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    kw = dict(speed=False, show_progress=False, log=lambda *_: None, batch_size=6)
    with _LargestVocabularyRows(vocab) as seen:
        lean = evaluate_models(str(teacher), {"student": str(student)}, str(data), None, memory_budget_bytes=1, **kw)
    assert 8 <= seen.rows <= 16 < 6 * 59 // 4, seen.rows
    # The default budget (chunks of thousands of tokens) gives the same numbers.
    full = evaluate_models(str(teacher), {"student": str(student)}, str(data), None, **kw)
    for name in ("teacher", "student"):
        for key in ("cross_entropy", "kl_to_teacher", "top1_accuracy", "agreement"):
            assert lean["models"][name][key] == pytest.approx(full["models"][name][key], rel=RTOL, abs=1e-9)


def test_models_the_head_cannot_reproduce_are_evaluated_on_their_own_logits():
    config = _configs()["llama_padded"]
    student, teacher = _model(config, 1), _model(config, 2)
    forward = student.forward

    def doubled(*args, **kwargs):  # post-processing that `output_head` does not know about
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    student.forward = doubled
    batches = _batches(2)
    assert checked_head(student, batches[0]["input_ids"][:1]) is None
    got = evaluate_batches(student, teacher, batches, VOCAB, torch.device("cpu"), memory_budget_bytes=TINY_BUDGET)
    reference = TokenSums()
    with torch.no_grad():
        for batch in batches:
            reference.add(token_sums(_dense_logits(student, batch), batch["labels"], _dense_logits(teacher, batch)))
    ref = reference.means()
    for key in ("cross_entropy", "kl_to_teacher", "agreement"):
        assert _rel(got[key], ref[key]) <= RTOL, key


def test_dense_rows_slice_padded_vocabulary():
    logits = torch.arange(24.0).reshape(4, 6)  # (N, V_model)
    rows = dense_rows(logits, 4)(torch.tensor([2, 0]))
    assert rows.shape == (2, 4) and rows.dtype == torch.float32
    assert rows.tolist() == [logits[2, :4].tolist(), logits[0, :4].tolist()]


def test_run_report_starts_after_training_memory_is_freed(tmp_path, monkeypatch, teacher_dir, student_dir, train_file):
    import yaml

    import distill.report.evaluate
    import distill.train.setup
    from distill.cli import main

    alive: dict[str, weakref.ref] = {}
    load_models = distill.train.setup.load_models

    def recording_load_models(*args, **kwargs):
        models = load_models(*args, **kwargs)
        alive["student"], alive["teacher"] = weakref.ref(models.student), weakref.ref(models.teacher)
        return models

    still_alive = []

    def checking_evaluate_models(*args, **kwargs):
        gc.collect()
        still_alive.extend(name for name, ref in alive.items() if ref() is not None)
        return None

    monkeypatch.setattr(distill.train.setup, "load_models", recording_load_models)
    monkeypatch.setattr(distill.report.evaluate, "evaluate_models", checking_evaluate_models)
    recipe = {
        "teacher": {"path": str(teacher_dir)},
        "student": {"path": str(student_dir)},
        "data": {"train": str(train_file), "max_length": 32},
        "objective": {"fused": True},
        "training": {"steps": 1, "batch_size": 2, "save_every": 10, "eval_every": 10, "eval_batches": 1},
        "report": {"enabled": True, "speed": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    assert set(alive) == {"student", "teacher"}
    assert still_alive == [], f"training's {still_alive} still in memory while the report runs"


# ---------------------------------------------------------------- distill eval keeps a run's rows whole


@pytest.fixture(scope="module")
def long_context_teacher(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("long-teacher")
    config = llama_config(len(tokenizer), hidden=16, layers=1)
    config.max_position_embeddings = 2048
    return save_model(config, tokenizer, folder, seed=4)


def test_distill_eval_keeps_a_runs_1024_token_rows_whole(tmp_path, tokenizer, long_context_teacher):
    from distill.cli import main

    ids = torch.randint(3, len(tokenizer), (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    mask = [False] * 24 + [True] * 1000  # a run's eval-data.jsonl row: ids and loss mask
    data = write_jsonl(tmp_path / "eval-data.jsonl", [{"input_ids": ids, "loss_mask": mask}])
    out = tmp_path / "report"
    args = ["eval", "--teacher", str(long_context_teacher), "--student", str(long_context_teacher)]
    assert main([*args, "--data", str(data), "--out", str(out), "--no-speed", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["counted_tokens"] == 1000  # every loss token of the row (targets 24..1023)
    assert report["data"]["truncated_rows"] == 0
    # An explicit limit still cuts, as asked.
    assert main([*args, "--data", str(data), "--out", str(out), "--no-speed", "--quiet", "--max-length", "100"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["counted_tokens"] == 100 - 24 and report["data"]["truncated_rows"] == 1


def test_eval_cuts_rows_only_to_what_the_models_can_read(tmp_path, tokenizer, teacher_dir, long_context_teacher):
    # teacher_dir's context is 256 positions: a longer row is cut there, not at a fixed default.
    ids = torch.randint(3, len(tokenizer), (300,), generator=torch.Generator().manual_seed(1)).tolist()
    data = write_jsonl(tmp_path / "eval.jsonl", [{"input_ids": ids}])
    kwargs = dict(speed=False, show_progress=False, log=lambda *_: None)
    report = evaluate_models(str(teacher_dir), {"student": str(long_context_teacher)}, str(data), None, **kwargs)
    assert report["data"]["max_length"] == 256 and report["data"]["truncated_rows"] == 1
    assert report["data"]["counted_tokens"] == 255
