"""`distill generate` with a local teacher: rows, sampling, log-probs, dedupe, chat rows, resume, CLI, and
sequence-level distillation end to end (generate, then train a student on the file)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from distill.cli import main
from distill.config import recipe_from_dict
from distill.data import build_examples
from distill.errors import DistillError
from distill.generate.local import _finish, sample_completions
from distill.generate.partial import PartialFile
from distill.generate.prompts import encode_prompt, read_prompts
from distill.generate.run import generate
from distill.models import load_model, load_tokenizer
from helpers import write_recipe

PROMPTS = [
    {"prompt": "def add(a, b):"},
    {"prompt": "the quick brown"},
    {"prompt": "for i in"},
    {"prompt": "def add(a, b):"},  # a duplicate: generated once
    {"messages": [{"role": "user", "content": "hello teacher"}]},
    {"prompt": "import os\n"},
    {"prompt": "knowledge distillation trains"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"}]},
]
UNIQUE = len(PROMPTS) - 1


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def make_recipe(teacher_dir, prompts_file, out: Path, **generate_fields):
    fields = {"prompts": str(prompts_file), "output": str(out), "max_new_tokens": 8, "batch_size": 3}
    fields.update(generate_fields)
    # float32 wherever the tests run: the references below are float32 forward passes.
    return recipe_from_dict({"teacher": {"path": str(teacher_dir), "dtype": "float32"}, "generate": fields})


def read_rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_model(str(teacher_dir), "teacher", torch.float32).eval()


@pytest.fixture(scope="module")
def teacher_tokenizer(teacher_dir):
    return load_tokenizer(str(teacher_dir), "teacher")


def quiet(_line: str) -> None:
    pass


def test_rows_fields_sample_counts_and_order(tmp_path, teacher_dir, prompts_file):
    out = tmp_path / "gen.jsonl"
    recipe = make_recipe(teacher_dir, prompts_file, out, samples_per_prompt=3, dedupe=False, logprobs=2)
    assert generate(recipe, log=quiet) == out
    rows = read_rows_of(out)
    assert len(rows) == UNIQUE * 3
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(p, s) for p in range(UNIQUE) for s in range(3)]
    prompts = read_prompts(str(prompts_file))
    assert len(prompts) == UNIQUE and prompts[3].messages is not None
    for r in rows:
        assert "input_ids" not in r  # the data loader would read such rows as pre-tokenized
        assert isinstance(r["completion"], str) and r["finish_reason"] in ("stop", "length")
        assert len(r["completion_ids"]) == len(r["token_logprobs"]) == len(r["top_logprobs"]) <= 8
        assert all(len(step) == 2 for step in r["top_logprobs"])
        source = prompts[r["prompt_index"]]
        if source.messages is None:
            assert r["prompt"] == source.prompt
        else:
            assert r["messages"][:-1] == source.messages
            assert r["messages"][-1] == {"role": "assistant", "content": r["completion"]}
    # Nothing is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "prompts.jsonl"]


def test_same_seed_same_file_other_seed_other_samples(tmp_path, teacher_dir, prompts_file):
    def run(name: str, seed: int) -> str:
        recipe = make_recipe(teacher_dir, prompts_file, tmp_path / name, samples_per_prompt=2, dedupe=False)
        recipe.training.seed = seed
        return generate(recipe, log=quiet).read_text()

    first = run("a.jsonl", 0)
    assert run("b.jsonl", 0) == first
    assert run("c.jsonl", 1) != first
    # Two samples of one prompt differ (sampling, not copies of one draw).
    rows = [json.loads(line) for line in first.splitlines()]
    assert any(rows[i]["completion_ids"] != rows[i + 1]["completion_ids"] for i in range(0, len(rows), 2))


def argmax_loop(model, prompt_ids: list[int], steps: int, vocab: int, eos: int) -> list[int]:
    """Greedy decoding by hand: full forward pass per step, no cache, no padding."""
    ids = list(prompt_ids)
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1, :vocab]
        ids.append(int(logits.argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt_ids) :]


def test_greedy_equals_hand_rolled_argmax_loop(tmp_path, teacher_dir, prompts_file, teacher, teacher_tokenizer):
    out = tmp_path / "greedy.jsonl"
    generate(make_recipe(teacher_dir, prompts_file, out, temperature=0, max_new_tokens=10), log=quiet)
    rows = read_rows_of(out)
    assert len(rows) == UNIQUE
    prompts = read_prompts(str(prompts_file))
    for r in rows:
        prompt_ids = encode_prompt(teacher_tokenizer, prompts[r["prompt_index"]])
        assert r["prompt_ids"] == prompt_ids
        expected = argmax_loop(teacher, prompt_ids, 10, len(teacher_tokenizer), teacher_tokenizer.eos_token_id)
        assert r["completion_ids"] == expected


def test_logprobs_equal_teacher_forward_pass(tmp_path, teacher_dir, prompts_file, teacher, teacher_tokenizer):
    out = tmp_path / "lp.jsonl"
    generate(make_recipe(teacher_dir, prompts_file, out, logprobs=5, samples_per_prompt=2, dedupe=False), log=quiet)
    vocab = len(teacher_tokenizer)
    # The teacher's embedding is padded past its tokenizer: log-probs are over the real vocabulary only.
    assert teacher.get_output_embeddings().weight.shape[0] > vocab
    with torch.no_grad():
        for r in read_rows_of(out):
            ids = r["prompt_ids"] + r["completion_ids"]
            logits = teacher(torch.tensor([ids])).logits[0, :, :vocab]  # (T, V)
            reference = torch.log_softmax(logits.float(), dim=-1)[len(r["prompt_ids"]) - 1 : -1]  # (C, V)
            assert reference.shape[0] == len(r["top_logprobs"])
            for step, (top, chosen) in enumerate(zip(r["top_logprobs"], r["token_logprobs"], strict=True)):
                ids_k = [i for i, _ in top]
                values = torch.tensor([lp for _, lp in top])
                assert all(0 <= i < vocab for i in ids_k)
                # Stored values equal the reference at the stored ids, and are its 5 largest (ties may reorder).
                assert torch.allclose(reference[step, ids_k], values, atol=1e-4)
                assert torch.allclose(reference[step].topk(5).values, values, atol=1e-4)
                assert abs(reference[step, r["completion_ids"][step]].item() - chosen) < 1e-4


def test_dedupe_removes_identical_completions_of_one_prompt(tmp_path, teacher_dir, prompts_file):
    # Greedy: every sample of a prompt is the same, so dedupe keeps exactly one per prompt.
    kept = tmp_path / "dedupe.jsonl"
    generate(make_recipe(teacher_dir, prompts_file, kept, temperature=0, samples_per_prompt=3), log=quiet)
    rows = read_rows_of(kept)
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(p, 0) for p in range(UNIQUE)]
    everything = tmp_path / "all.jsonl"
    generate(
        make_recipe(teacher_dir, prompts_file, everything, temperature=0, samples_per_prompt=3, dedupe=False),
        log=quiet,
    )
    all_rows = read_rows_of(everything)
    assert len(all_rows) == UNIQUE * 3
    assert [r for r in all_rows if r["sample"] == 0] == rows


def test_output_trains_as_prompt_completion_and_chat_rows(tmp_path, teacher_dir, prompts_file, teacher_tokenizer):
    out = tmp_path / "gen.jsonl"
    generate(make_recipe(teacher_dir, prompts_file, out, temperature=0, max_new_tokens=6), log=quiet)
    rows = read_rows_of(out)
    examples, stats = build_examples(out, teacher_tokenizer, max_length=256)
    assert stats.rows == UNIQUE and stats.bad_rows == 0
    by_row = dict(zip([r["prompt_index"] for r in rows if r["completion"]], examples, strict=True))
    for r in rows:
        if not r["completion"]:
            continue
        e = by_row[r["prompt_index"]]
        # The prompt side of a training example is exactly what the teacher was given.
        assert e.input_ids[: len(r["prompt_ids"])] == r["prompt_ids"]
        assert not any(e.loss_mask[: len(r["prompt_ids"]) - ("messages" in r)])
        target = [t for t, m in zip(e.input_ids, e.loss_mask, strict=True) if m]
        # The completion side is the teacher's own ids (re-tokenizing its text may split it otherwise), chat rows
        # included; a completion cut at max_new_tokens did not end: no EOS to learn, and an ending EOS is not doubled.
        eos = teacher_tokenizer.eos_token_id
        ended = r["finish_reason"] != "length" and r["completion_ids"][-1:] != [eos]
        assert target == r["completion_ids"] + ([eos] if ended else [])
        assert teacher_tokenizer.decode(target, skip_special_tokens=True) == r["completion"]


def test_messages_rows_use_the_chat_template(teacher_tokenizer):
    prompt = read_prompts_from([{"messages": [{"role": "user", "content": "hi"}]}])[0]
    ids = encode_prompt(teacher_tokenizer, prompt)
    assert teacher_tokenizer.decode(ids) == "<|bos|>user: hi<|eos|><|bos|>assistant: "


def read_prompts_from(rows):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return read_prompts(str(write_jsonl(Path(folder) / "p.jsonl", rows)))


def test_bad_prompt_rows_are_one_line_errors(tmp_path):
    for rows, needle in [
        ([{"text": "no prompt"}], '"prompt"'),
        ([{"messages": "hi"}], '"messages"'),
        ([{"messages": []}], '"messages"'),
        ([], "no rows"),
    ]:
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DistillError, match=needle):
            read_prompts(str(path))


def test_finish_reasons_eos_stop_string_and_length(teacher_tokenizer):
    tok = teacher_tokenizer
    eos = tok.eos_token_id
    body = tok("hello world, hello student", add_special_tokens=False)["input_ids"]
    # EOS ends the completion; it is one of the produced tokens but not part of the text.
    assert _finish(tok, [*body, eos, 0, 0], {eos}, [], 10) == (len(body) + 1, "hello world, hello student", "stop")
    # A stop string: the text stops before it; the produced tokens run up to the one completing it.
    length, text, reason = _finish(tok, [*body, eos], {eos}, [", hello"], 10)
    assert (text, reason) == ("hello world", "stop")
    assert tok.decode(body[: length - 1]).find(", hello") < 0 <= tok.decode(body[:length]).find(", hello")
    # No EOS, no stop string: the length limit.
    assert _finish(tok, body, {eos}, ["zzz"], len(body)) == (len(body), "hello world, hello student", "length")


def test_stop_strings_cut_local_completions(teacher, teacher_tokenizer):
    prompt = teacher_tokenizer("def add(a, b):")["input_ids"]
    free = sample_completions(teacher, teacher_tokenizer, [prompt], max_new_tokens=12, temperature=0)[0][0]
    stop = free.text[3:5]
    assert stop and free.text.find(stop) == 3
    cut = sample_completions(teacher, teacher_tokenizer, [prompt], max_new_tokens=12, temperature=0, stop=[stop])[0][0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:3]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]


class Interrupt(BaseException):
    pass


def interrupt_after(monkeypatch, prompts_done: int) -> None:
    """Make the run die (like a kill) once `prompts_done` prompts are in the partial file."""
    original = PartialFile.append

    def append(self, rows):
        original(self, rows)
        if len(self.done) >= prompts_done:
            raise Interrupt

    monkeypatch.setattr(PartialFile, "append", append)


def test_resume_drops_torn_tail_and_matches_uninterrupted_run(tmp_path, teacher_dir, prompts_file, monkeypatch):
    settings = {"samples_per_prompt": 2, "logprobs": 2, "dedupe": False}
    reference = generate(make_recipe(teacher_dir, prompts_file, tmp_path / "ref.jsonl", **settings), log=quiet)
    out = tmp_path / "resumed.jsonl"
    recipe = make_recipe(teacher_dir, prompts_file, out, **settings)
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(Interrupt):
            generate(recipe, log=quiet)
    partial = tmp_path / ".resumed.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 8
    # What a kill may leave on top: one sample of a prompt whose second sample never came, and a torn line.
    rows = read_rows_of(partial)
    done = {r["prompt_index"] for r in rows}
    other = next(i for i in range(UNIQUE) if i not in done)
    half = {**rows[0], "prompt_index": other, "completion": "made up"}
    with partial.open("a") as f:
        f.write(json.dumps(half) + "\n" + json.dumps(rows[1])[:17])
    lines: list[str] = []
    generate(recipe, log=lines.append)
    assert any("4 prompts already done" in line for line in lines)
    assert out.read_bytes() == reference.read_bytes()
    assert not partial.exists()


def test_partial_file_from_other_settings_is_refused(tmp_path, teacher_dir, prompts_file, monkeypatch):
    out = tmp_path / "gen.jsonl"
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(Interrupt):
            generate(make_recipe(teacher_dir, prompts_file, out), log=quiet)
    with pytest.raises(DistillError, match=r"different generate.temperature \(was 1.0, now 0.5\).*delete it") as e:
        generate(make_recipe(teacher_dir, prompts_file, out, temperature=0.5), log=quiet)
    assert "\n" not in str(e.value)
    write_jsonl(prompts_file, [*PROMPTS, {"prompt": "one more"}])
    with pytest.raises(DistillError, match="different set of prompts"):
        generate(make_recipe(teacher_dir, prompts_file, out), log=quiet)
    write_jsonl(prompts_file, PROMPTS)
    generate(make_recipe(teacher_dir, prompts_file, out), log=quiet)  # the original recipe continues
    assert len(read_rows_of(out)) == UNIQUE


def test_cli_generate_end_to_end_and_bad_input(tmp_path, teacher_dir, prompts_file, capsys):
    out = tmp_path / "out.jsonl"
    content = {
        "teacher": {"path": str(teacher_dir)},
        "generate": {"prompts": str(prompts_file), "output": str(out), "max_new_tokens": 4},
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", content)
    assert main(["generate", str(recipe), "generate.samples_per_prompt=2", "--quiet"]) == 0
    assert len(read_rows_of(out)) <= UNIQUE * 2 and {r["prompt_index"] for r in read_rows_of(out)} == set(range(7))
    assert f"to {out}" in capsys.readouterr().out
    for args, needle in [
        (["generate.temperature=-1"], "generate.temperature"),
        (["generate.logprobs=21"], "generate.logprobs"),
        (["teacher.path=null"], "teacher.path or teacher.endpoint"),
        ([f"generate.prompts={tmp_path / 'missing.jsonl'}"], "does not exist"),
        (["generate.max_new_tokens=1000"], "context"),
    ]:
        capsys.readouterr()
        assert main(["generate", str(recipe), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (args, err)


def wait_for_lines(path: Path, count: int, process, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.is_alive(), "the run ended before it could be killed"
        time.sleep(0.005)
    raise AssertionError(f"{path} never reached {count} lines")


def _cli_in_child(args: list[str]) -> None:
    torch.set_num_threads(1)
    os._exit(main(args))


def forked(target, *args):
    """A child process that already has torch and distill imported (a fresh interpreter takes ~5-15 s here)."""
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path, teacher_dir, one_thread):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"def f{i}(x):"} for i in range(30)])
    settings = {
        "teacher": {"path": str(teacher_dir)},
        "generate": {"prompts": str(prompts), "max_new_tokens": 16, "batch_size": 2, "samples_per_prompt": 2},
        "training": {"seed": 3},
    }
    reference = tmp_path / "ref.jsonl"
    recipe = write_recipe(tmp_path / "r.yaml", {**settings, "output": {"dir": str(tmp_path / "run")}})
    assert main(["generate", str(recipe), f"generate.output={reference}", "--quiet"]) == 0

    out = tmp_path / "run" / "generated.jsonl"
    partial = tmp_path / "run" / ".generated.jsonl.partial"
    process = forked(_cli_in_child, ["generate", str(recipe), "--quiet"])
    try:
        wait_for_lines(partial, 6, process)
        process.kill()  # SIGKILL: no cleanup of any kind
    finally:
        process.join()
    assert process.exitcode == -signal.SIGKILL and not out.exists()
    assert main(["generate", str(recipe), "--quiet"]) == 0
    identical = out.read_bytes() == reference.read_bytes()  # not `assert a == b`: pytest's diff of it takes minutes
    assert identical, "the resumed file differs from the uninterrupted one"


@pytest.mark.slow
def test_sequence_level_distillation_generate_then_train(tmp_path, teacher_dir, student_dir):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("def add(a, b):", "the quick", "for i in", "hello")]
    )
    generated = tmp_path / "generated.jsonl"
    content = {
        "teacher": {"path": str(teacher_dir)},
        "student": {"path": str(student_dir)},
        "data": {"train": str(generated), "eval": str(generated), "max_length": 48},
        "objective": {"kd_weight": 0.0, "ce_weight": 1.0},  # sequence-level: hard labels on the teacher's text
        "training": {"steps": 6, "batch_size": 4, "lr": 1e-2, "log_every": 1, "eval_every": 100, "save_every": 100},
        "generate": {"prompts": str(prompts), "output": str(generated), "samples_per_prompt": 2, "max_new_tokens": 16},
        "report": {"enabled": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", content)
    assert main(["generate", str(recipe), "--quiet"]) == 0
    assert main(["train", str(recipe), "--quiet"]) == 0
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e.get("event") == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the student learns the teacher's completions
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
