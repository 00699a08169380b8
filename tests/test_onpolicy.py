"""On-policy distillation (GKD): step choice, the student's samples, the loss on them, training, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CORPUS, qwen2_config, save_model, write_jsonl
from distill.cli import main
from distill.config import recipe_from_dict
from distill.data import Example, build_examples, collate
from distill.errors import DistillError
from distill.losses.dense import IGNORE_INDEX, distillation_loss
from distill.losses.heads import output_head
from distill.models import Models, load_model
from distill.sampling import eos_ids
from distill.train.loop import train
from distill.train.onpolicy import (
    OnPolicy,
    is_on_policy_step,
    prompt_length,
    sample_completions,
    sampling_seed,
)
from distill.train.step import StudentLoss, step_loss
from helpers import final_weights, recipe_dict

CPU = torch.device("cpu")
MAX_LENGTH = 40


def quiet(_):
    pass


@pytest.fixture()
def pc_file(tmp_path) -> Path:
    """Prompt/completion rows: the prompt is a prefix of a corpus line, the completion the rest."""
    rows = []
    for i in range(24):
        line = CORPUS[i % len(CORPUS)]
        cut = 6 + i % 5
        rows.append({"prompt": line[:cut], "completion": line[cut:]})
    return write_jsonl(tmp_path / "pc.jsonl", rows)


def recipe(teacher_dir, student_dir, train_file, out, **sections) -> dict:
    defaults = {
        "data": {"max_length": MAX_LENGTH},
        "objective": {"divergence": "reverse_kl", "on_policy": {"lambda": 1.0, "max_new_tokens": 8}},
        "training": {"eval_every": 100},
    }
    # deep: objective={"on_policy": {...}} merges into the on_policy settings above.
    return recipe_dict(teacher_dir, student_dir, train_file, out, defaults, deep=True, **sections)


# ---------------------------------------------------------------- which steps


def test_step_choice_is_a_pure_function_with_the_asked_share():
    for share in (0.1, 0.5, 0.9):
        choices = [is_on_policy_step(7, step, share) for step in range(4000)]
        assert abs(sum(choices) / len(choices) - share) < 0.03
        assert choices == [is_on_policy_step(7, step, share) for step in range(4000)]
    assert [is_on_policy_step(0, s, 0.5) for s in range(64)] != [is_on_policy_step(1, s, 0.5) for s in range(64)]
    assert not any(is_on_policy_step(0, s, 0.0) for s in range(100))
    assert all(is_on_policy_step(0, s, 1.0) for s in range(100))
    seeds = {sampling_seed(0, s, r, j) for s in range(4) for r in range(2) for j in range(3)}
    assert len(seeds) == 24 and all(0 <= x < 2**63 for x in seeds)


def test_prompt_is_everything_before_the_first_loss_token_or_a_prefix():
    with_prompt = Example([5, 6, 7, 8, 9], [False, False, False, True, True])
    assert prompt_length(with_prompt, prefix_tokens=16) == 3
    text = Example(list(range(10, 40)), [True] * 30)
    assert prompt_length(text, prefix_tokens=16) == 16
    assert prompt_length(Example([10, 11, 12], [True] * 3), prefix_tokens=16) == 2  # one token always follows
    assert prompt_length(text, prefix_tokens=0) == 0


# ---------------------------------------------------------------- sampling


def _student(student_dir):
    return load_model(str(student_dir), "student", torch.float32)


def test_left_padded_batch_samples_what_each_prompt_samples_alone(tokenizer, student_dir, teacher_dir):
    prompts = [[1, 40, 41], [1, 50, 51, 52, 53, 54, 55], [1, 60], [1, 70, 71, 72, 73]]
    common = dict(top_p=1.0, eos_ids=[2], pad_id=0, device=CPU)
    for folder in (student_dir, teacher_dir):  # Qwen2 and Llama
        model = _student(folder).eval()
        batched = sample_completions(model, prompts, [10] * 4, temperature=0.0, seed=0, **common)
        alone = [sample_completions(model, [p], [10], temperature=0.0, seed=0, **common)[0] for p in prompts]
        assert batched == alone
        assert all(len(c) == 10 for c in batched)  # random tiny models do not stop by themselves
        # Greedy continuation, checked token by token with plain forward passes of the unpadded prompt.
        ids = torch.tensor([prompts[1] + batched[1]])
        with torch.no_grad():
            argmax = model(input_ids=ids).logits[0, len(prompts[1]) - 1 : -1].argmax(-1).tolist()
        assert argmax == batched[1]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(student_dir):
    model = _student(student_dir).eval()
    prompts = [[1, 40, 41], [1, 50]]
    common = dict(temperature=1.0, top_p=1.0, eos_ids=[2], pad_id=0, device=CPU)
    before = torch.get_rng_state()
    a = sample_completions(model, prompts, [12, 12], seed=3, **common)
    assert torch.equal(torch.get_rng_state(), before)
    assert sample_completions(model, prompts, [12, 12], seed=3, **common) == a
    assert sample_completions(model, prompts, [12, 12], seed=4, **common) != a


class _ScriptedModel:
    """Stands in for a model whose generate returns fixed tokens, to check how completions are cut."""

    def __init__(self, new_tokens):
        self.new_tokens = torch.tensor(new_tokens)
        self.generation_config = "checkpoint settings"
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        self.calls.append((input_ids, attention_mask, generation_config, self.generation_config))
        return torch.cat([input_ids, self.new_tokens], dim=1)


def test_completions_end_after_the_first_eos_and_at_their_limit():
    pad, eos = 0, 2
    model = _ScriptedModel([[7, 8, eos, pad, pad], [7, eos, 9, eos, pad], [7, 8, 9, 10, 11], [eos, pad, pad, pad, pad]])
    prompts = [[1, 5], [1], [1, 5, 6], [1, 5]]
    out = sample_completions(
        model, prompts, [5, 5, 3, 5], temperature=0.7, top_p=0.9, eos_ids=[eos], pad_id=pad, seed=0, device=CPU
    )
    assert out == [[7, 8, eos], [7, eos], [7, 8, 9], [eos]]
    input_ids, attention_mask, config, config_seen = model.calls[0]
    assert input_ids.tolist() == [[pad, 1, 5], [pad, pad, 1], [1, 5, 6], [pad, 1, 5]]  # left padding
    assert attention_mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, 0.9, 0)
    assert config.max_new_tokens == 5 and config.eos_token_id == [eos] and config.pad_token_id == pad
    # The checkpoint's own sampling settings are out of the way during the call and back afterwards.
    assert config_seen != "checkpoint settings" and model.generation_config == "checkpoint settings"


def test_on_policy_examples_keep_prompts_and_mask_only_the_completion(tokenizer, student_dir, teacher_dir, pc_file):
    r = recipe_from_dict(recipe(teacher_dir, student_dir, pc_file, "unused"))
    examples, _ = build_examples(pc_file, tokenizer, MAX_LENGTH)
    model = _student(student_dir).train()
    on_policy = OnPolicy(r, tokenizer, examples, CPU)
    micro = [examples[:3], examples[3:5]]
    rng = torch.get_rng_state()
    new = on_policy.examples(model, step=0, rank=0, micro_batches=micro)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [len(m) for m in new] == [3, 2]
    eos = eos_ids(model, tokenizer)
    for old, sampled in zip(micro[0] + micro[1], new[0] + new[1], strict=True):
        n = prompt_length(old, 16)
        assert sampled.input_ids[:n] == old.input_ids[:n]
        assert sampled.loss_mask == [False] * n + [True] * (len(sampled.input_ids) - n)
        completion = sampled.input_ids[n:]
        assert 1 <= len(completion) <= 8 and len(sampled.input_ids) <= MAX_LENGTH
        assert not any(t in eos for t in completion[:-1])  # an EOS can only be the last token
    # The same step, rank and micro-batch give the same samples; another step other ones.
    assert on_policy.examples(model, 0, 0, micro) == new
    assert on_policy.examples(model, 1, 0, micro) != new
    fields = on_policy.log_fields(1.0)
    assert fields["on_policy_share"] == 1.0 and fields["generate_share"] > 0 and fields["generate_s"] > 0


def test_an_eos_sampled_by_the_student_counts_in_the_loss(tokenizer, student_dir, teacher_dir, pc_file):
    r = recipe_from_dict(recipe(teacher_dir, student_dir, pc_file, "unused"))
    examples, _ = build_examples(pc_file, tokenizer, MAX_LENGTH)
    model = _student(student_dir)
    bias = torch.zeros(model.config.vocab_size)
    bias[2] = 50.0  # EOS is (all but) certain at every position
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        new = OnPolicy(r, tokenizer, examples, CPU).examples(model, 0, 0, [examples[:2]])[0]
    finally:
        hook.remove()
    for old, sampled in zip(examples[:2], new, strict=True):
        n = prompt_length(old, 16)
        assert sampled.input_ids[n:] == [2] and sampled.loss_mask[n:] == [True]
        assert collate([sampled], 0)["labels"][0, n - 1].item() == 2  # the EOS is a target


def test_text_rows_are_prompted_with_their_first_tokens_or_refused(tokenizer, teacher_dir, student_dir, train_file):
    examples, _ = build_examples(train_file, tokenizer, MAX_LENGTH)
    r = recipe_from_dict(recipe(teacher_dir, student_dir, train_file, "unused", objective={"on_policy": {}}))
    new = OnPolicy(r, tokenizer, examples, CPU).examples(_student(student_dir), 0, 0, [examples[:2]])[0]
    for old, sampled in zip(examples[:2], new, strict=True):
        n = min(16, len(old.input_ids) - 1)
        assert sampled.input_ids[:n] == old.input_ids[:n] and not any(sampled.loss_mask[:n])
    refused = recipe_from_dict(
        recipe(teacher_dir, student_dir, train_file, "unused", objective={"on_policy": {"prefix_tokens": 0}})
    )
    with pytest.raises(DistillError, match=r"prefix_tokens: \d+ of \d+ training examples have no prompt"):
        OnPolicy(refused, tokenizer, examples, CPU)


# ---------------------------------------------------------------- the loss on the student's samples


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_step_loss_on_samples_is_the_loss_library_on_the_sampled_tokens(
    tokenizer, teacher_dir, student_dir, pc_file, fused, divergence, beta
):
    r = recipe_from_dict(
        recipe(
            teacher_dir,
            student_dir,
            pc_file,
            "unused",
            objective={"fused": fused, "divergence": divergence, "beta": beta, "temperature": 1.5},
        )
    )
    examples, _ = build_examples(pc_file, tokenizer, MAX_LENGTH)
    student = _student(student_dir)
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    sampled = OnPolicy(r, tokenizer, examples, CPU).examples(student, 0, 0, [examples[:4]])[0]
    batch = collate(sampled, tokenizer.pad_token_id)
    counted = batch["labels"] != IGNORE_INDEX  # (B, T-1): the sampled tokens, nothing else
    assert int(counted.sum()) == sum(e.loss_tokens for e in sampled)

    vocab = len(tokenizer)
    models = Models(student=student, teacher=teacher, tokenizer=tokenizer, vocab_size=vocab)
    loss_module = StudentLoss(student, r.objective, vocab, output_head(teacher) if fused else None)
    loss, kd_sum, *_ = step_loss(loss_module, models, batch, r, float(counted.sum()), None)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab]  # (B, T-1, V)
    student_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab]  # (B, T-1, V)
    expected = distillation_loss(
        student_logits, teacher_logits, divergence=divergence, beta=beta, temperature=1.5, mask=counted
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_sum / counted.sum(), expected.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training


def _own_sample_reverse_kl(model_dir, teacher_dir, tokenizer, pc_file) -> float:
    """Mean KL(student ‖ teacher) over the tokens of the student's own samples for the training prompts."""
    student = load_model(str(model_dir), "student", torch.float32).eval()
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    examples, _ = build_examples(pc_file, tokenizer, MAX_LENGTH)
    r = recipe_from_dict(recipe(teacher_dir, model_dir, pc_file, "unused"))
    sampler = OnPolicy(r, tokenizer, examples, CPU)
    vocab = len(tokenizer)
    total, count = 0.0, 0
    for j in range(0, len(examples), 8):
        batch = collate(sampler.examples(student, 1000, 0, [examples[j : j + 8]])[0], tokenizer.pad_token_id)
        counted = batch["labels"] != IGNORE_INDEX
        with torch.no_grad():
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
        total += float(distillation_loss(s, t, divergence="reverse_kl", mask=counted)) * int(counted.sum())
        count += int(counted.sum())
    return total / count


@pytest.mark.slow  # about 20 s: a learning curve, not a unit
def test_training_on_own_samples_lowers_reverse_kl_on_own_samples(
    tmp_path, tokenizer, teacher_dir, student_dir, pc_file
):
    out = tmp_path / "run"
    content = recipe(teacher_dir, student_dir, pc_file, out, training={"steps": 10, "lr": 1e-2, "batch_size": 8})
    train(recipe_from_dict(content), show_progress=False, log=quiet)
    before = _own_sample_reverse_kl(student_dir, teacher_dir, tokenizer, pc_file)
    after = _own_sample_reverse_kl(out / "student", teacher_dir, tokenizer, pc_file)
    assert after < 0.7 * before, (before, after)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    assert len(train_events) == 10
    assert all(e["on_policy_share"] == 1.0 and 0 < e["generate_share"] < 1 for e in train_events)


def test_lambda_zero_never_samples_and_changes_nothing(tmp_path, teacher_dir, student_dir, pc_file, monkeypatch):
    import distill.train.onpolicy

    def never(*_, **__):
        raise AssertionError("sampled with lambda 0")

    monkeypatch.setattr(distill.train.onpolicy, "sample_completions", never)
    off = tmp_path / "off"
    train(
        recipe_from_dict(recipe(teacher_dir, student_dir, pc_file, off, objective={"on_policy": {"lambda": 0.0}})),
        show_progress=False,
        log=quiet,
    )
    events = [json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()]
    assert not any("on_policy_share" in e for e in events)
    # lambda 0.5 with every step declined: the machinery alone changes no bit of training.
    monkeypatch.setattr(distill.train.onpolicy, "is_on_policy_step", lambda *_: False)
    declined = tmp_path / "declined"
    train(recipe_from_dict(recipe(teacher_dir, student_dir, pc_file, declined)), show_progress=False, log=quiet)
    a, b = final_weights(off), final_weights(declined)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_half_on_policy_steps_is_bitwise_exact(tmp_path, tokenizer, teacher_dir, pc_file, monkeypatch):
    # Dropout makes the training RNG matter: sampling must neither consume it nor be lost across a resume.
    student_dir = save_model(qwen2_config(len(tokenizer), attention_dropout=0.2), None, tmp_path / "s", seed=2)
    seed, steps = 3, 6
    choices = [is_on_policy_step(seed, s, 0.5) for s in range(steps)]
    assert any(choices[:4]) and not all(choices[:4]) and any(choices[4:]) and not all(choices[4:])

    def content(out):
        return recipe(
            teacher_dir,
            student_dir,
            pc_file,
            out,
            objective={"on_policy": {"lambda": 0.5}},
            training={"steps": steps, "seed": seed, "save_every": 2, "grad_accum": 2},
        )

    train(recipe_from_dict(content(tmp_path / "straight")), show_progress=False, log=quiet)

    import distill.train.step as step_module

    real, calls = step_module.step_loss, {"n": 0}

    def crash_in_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:  # first micro-batch of the fifth step, after checkpoint step-4
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(step_module, "step_loss", crash_in_step_5)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed"):
        train(recipe_from_dict(content(crashed)), show_progress=False, log=quiet)
    monkeypatch.setattr(step_module, "step_loss", real)
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-2", "step-4"]
    train(recipe_from_dict(content(crashed)), resume=True, show_progress=False, log=quiet)

    a, b = final_weights(tmp_path / "straight"), final_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed on-policy run differs from the uninterrupted one"
    events = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [e["on_policy_share"] for e in events if e["event"] == "train"] == [float(c) for c in choices]


# ---------------------------------------------------------------- refusals


def _refused(tmp_path, capsys, content) -> str:
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_impossible_on_policy_recipes_fail_with_one_line(
    tmp_path, capsys, teacher_dir, student_dir, pc_file, train_file
):
    def base(**sections):
        return recipe(teacher_dir, student_dir, pc_file, tmp_path / "run", **sections)

    cached = base()
    cached["teacher"]["cache"] = str(tmp_path / "cache")
    assert "teacher.cache" in _refused(tmp_path, capsys, cached)
    assert "kd_weight" in _refused(tmp_path, capsys, base(objective={"kd_weight": 0.0, "ce_weight": 1.0}))
    assert "objective.ce_weight" in _refused(tmp_path, capsys, base(objective={"ce_weight": 0.5}))
    text_only = recipe(
        teacher_dir, student_dir, train_file, tmp_path / "run", objective={"on_policy": {"prefix_tokens": 0}}
    )
    assert "objective.on_policy.prefix_tokens" in _refused(tmp_path, capsys, text_only)
    assert "objective.on_policy.top_p" in _refused(tmp_path, capsys, base(objective={"on_policy": {"top_p": 0}}))
    assert not (tmp_path / "run" / "student").exists()


def test_tokenizer_and_generation_config_eos_ids_both_end_completions(tokenizer, student_dir):
    model = _student(student_dir)
    model.generation_config.eos_token_id = [2, 7]
    assert eos_ids(model, tokenizer) == [2, 7]
    model.generation_config.eos_token_id = None
    assert eos_ids(model, tokenizer) == [tokenizer.eos_token_id]


# ---------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_fsdp_processes_sample_in_step_and_train(tmp_path, teacher_dir, student_dir, pc_file):
    """Each rank samples its own prompts, and the ranks keep making the same forward calls until all are done (a
    rank whose completions end early would otherwise leave the others waiting in an all-gather). DDP takes the same
    path with whole weights; it is left out to keep the suite short."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    content = recipe(
        teacher_dir,
        student_dir,
        pc_file,
        out,
        objective={"fused": True, "on_policy": {"lambda": 0.5}},
        training={"steps": 4, "batch_size": 4, "grad_accum": 2, "distributed": "fsdp", "seed": 3},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    done = subprocess.run(
        [*launcher, "-m", "distill", "train", str(path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = [e["on_policy_share"] for e in events if e["event"] == "train"]
    assert shares == [float(is_on_policy_step(3, s, 0.5)) for s in range(4)] and 0 < sum(shares) < 4
    before = load_file(str(student_dir / "model.safetensors"))
    after = final_weights(out)
    assert all(torch.isfinite(after[k]).all() for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
