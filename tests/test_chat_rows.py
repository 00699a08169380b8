"""Rows say what they train: labels, unknown keys, the EOS set, the prompt/completion boundary, and chat rows of a
ChatML template (the `\\n` after `<|im_end|>` is context), including completions written by an OpenAI-compatible
server through `distill generate` and turned into a cache with cache.source=generated."""

from __future__ import annotations

import json

import pytest

from conftest import save_model, train_tokenizer, write_jsonl
from distill.data import build_examples, encode_row, end_ids
from distill.errors import DistillError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_chatml_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer with ChatML specials (eos `<|im_end|>`, as instruct models have it)."""
    return train_tokenizer(
        vocab_size,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        CHATML,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="module")
def chatml():
    return train_chatml_tokenizer()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, chatml):
    """A tokenizer folder with a generation config whose EOS set is [<|im_end|>, <|endoftext|>] (Qwen2.5-Instruct)."""
    folder = tmp_path_factory.mktemp("chatml")
    chatml.save_pretrained(folder)
    eos = [chatml.convert_tokens_to_ids("<|im_end|>"), chatml.convert_tokens_to_ids("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _targets(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


# ---------------------------------------------------------------- pre-tokenized rows: labels


def test_labels_say_which_tokens_are_targets(tokenizer):
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, -100]}
    assert encode_row(row, tokenizer) == ([5, 6, 7, 8, 9], [False, False, True, True, False])
    # A tokenized data set's all-ones attention mask is accepted; the example is the same.
    assert encode_row({**row, "attention_mask": [1] * 5}, tokenizer) == encode_row(row, tokenizer)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        # Shifted labels (labels[i] = input_ids[i+1]) are one shorter: refused, naming the convention.
        ({"input_ids": [5, 6, 7], "labels": [6, 7]}, "aligned with input_ids"),
        ({"input_ids": [5, 6, 7], "labels": [-100, 9, 7]}, r'"labels"\[1\] is 9 but "input_ids"\[1\] is 6'),
        ({"input_ids": [5, 6], "labels": [5, 6], "loss_mask": [1, 1]}, "not both"),
        ({"input_ids": [5, 6], "labels": "5 6"}, '"labels" must be a list of integers'),
        ({"input_ids": [5, 6], "attention_mask": [1, 0]}, "all ones"),
    ],
)
def test_labels_that_do_not_line_up_are_refused(tokenizer, row, message):
    with pytest.raises(ValueError, match=message):
        encode_row(row, tokenizer)


# ---------------------------------------------------------------- keys a format does not read


@pytest.mark.parametrize(
    ("row", "key", "kind"),
    [
        ({"text": "hello world", "labels": [1, 2]}, "labels", "text"),
        ({"prompt": "hello", "completion": " world", "response": " x"}, "response", "prompt/completion"),
        ({"prompt": "hello", "completion": " world", "text": "other"}, "text", "prompt/completion"),
        (
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "loss_mask": [1],
            },
            "loss_mask",
            "messages",
        ),
        ({"input_ids": [5, 6], "mask": [0, 1]}, "mask", "input_ids"),
    ],
)
def test_keys_a_row_format_does_not_read_are_refused(tmp_path, tokenizer, row, key, kind):
    with pytest.raises(ValueError, match=f"key '{key}' is not read by a {kind} row"):
        encode_row(row, tokenizer)
    # One line through the loader, naming the file and line; data.ignore_keys lets metadata through.
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "fine", "completion": " row"}, row])
    with pytest.raises(DistillError, match=f"rows.jsonl:2: key '{key}'") as error:
        build_examples(path, tokenizer, 32)
    assert "\n" not in str(error.value)
    examples, _ = build_examples(path, tokenizer, 32, ignore_keys=[key])
    assert len(examples) == 2


def test_distill_generate_rows_keep_their_metadata(tokenizer):
    row = {"prompt_index": 0, "sample": 1, "prompt": "hello", "completion": " world", "finish_reason": "stop"}
    ids = _ids(tokenizer, " world")
    row |= {"stop_reason": None, "completion_ids": ids, "token_logprobs": [-1.0] * len(ids), "top_logprobs": []}
    assert encode_row(row, tokenizer) == encode_row({"prompt": "hello", "completion": " world"}, tokenizer)


# ---------------------------------------------------------------- the EOS set


def test_any_id_of_the_eos_set_ends_a_row(chatml_dir):
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(str(chatml_dir), "teacher")
    im_end, end_of_text = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert tokenizer.eos_token_id == im_end and end_ids(tokenizer) == {im_end, end_of_text}
    # Text that ends with the generation config's other EOS gets no second EOS, in every format.
    ids, _ = encode_row({"text": "hello world<|endoftext|>"}, tokenizer)
    assert ids == _ids(tokenizer, "hello world") + [end_of_text]
    ids, _ = encode_row({"prompt": "hello", "completion": " world<|endoftext|>"}, tokenizer)
    assert ids[-1] == end_of_text and ids[-2] != im_end
    row = {"prompt_ids": [5], "completion_ids": [6, end_of_text], "finish_reason": "stop"}
    assert encode_row(row, tokenizer)[0] == [5, 6, end_of_text]
    # Without one, the tokenizer's EOS is appended.
    assert encode_row({"text": "hello world"}, tokenizer)[0][-1] == im_end


# ---------------------------------------------------------------- prompt/completion boundary


def test_prompt_and_completion_are_tokenized_separately(tokenizer):
    prompt, completion = "the quick ", "brown fox"
    separate = tokenizer(prompt)["input_ids"] + _ids(tokenizer, completion)
    joint = tokenizer(prompt + completion)["input_ids"]
    assert separate != joint  # the case where the choice matters: BPE glues the prompt's space to "brown"
    ids, mask = encode_row({"prompt": prompt, "completion": completion}, tokenizer)
    n = len(tokenizer(prompt)["input_ids"])
    # The prompt's tokens are exactly those `distill generate` and a server feed the model for that prompt.
    from distill.generate.prompts import Prompt, encode_prompt

    assert ids[:n] == encode_prompt(tokenizer, Prompt(0, prompt=prompt))
    assert ids == separate + [tokenizer.eos_token_id] and mask == [False] * n + [True] * (len(ids) - n)
    assert tokenizer.decode(ids[:n]) == prompt and _targets(tokenizer, ids, mask) == completion + "<|eos|>"


# ---------------------------------------------------------------- how a completion ended


def test_a_completion_stopped_at_a_stop_string_gets_no_eos(tokenizer):
    eos = tokenizer.eos_token_id
    base = {"prompt": "def add(a, b):", "completion": "\n    return a"}
    stopped = encode_row({**base, "finish_reason": "stop", "stop_reason": "\n\n"}, tokenizer)[0]
    assert stopped == encode_row({**base, "finish_reason": "length"}, tokenizer)[0] and stopped[-1] != eos
    # Stopped by EOS (vLLM: stop_reason null) or at a stop token id: that token ends it.
    assert encode_row({**base, "finish_reason": "stop", "stop_reason": None}, tokenizer)[0] == stopped + [eos]
    assert encode_row({**base, "finish_reason": "stop", "stop_reason": 7}, tokenizer)[0] == stopped + [7]
    ids_row = {"prompt_ids": [1, 5], "completion_ids": [6, 7], "finish_reason": "stop", "stop_reason": "b"}
    assert encode_row(ids_row, tokenizer) == ([1, 5, 6, 7], [False, False, True, True])


# ---------------------------------------------------------------- chat rows of a ChatML template


def test_chatml_newline_after_the_end_of_turn_is_context(chatml):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick brown fox"},
        {"role": "user", "content": "for i in range(10):"},
        {"role": "assistant", "content": "print(i * i)"},
    ]
    ids, mask = encode_row({"messages": messages}, chatml)
    assert ids == _ids(chatml, chatml.apply_chat_template(messages, tokenize=False))
    runs, current = [], []
    for token, counted in zip(ids, mask, strict=True):
        if counted:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    # Each reply through its <|im_end|>; the template's "\n" after it is never a target.
    assert [chatml.decode(r) for r in runs] == ["the quick brown fox<|im_end|>", "print(i * i)<|im_end|>"]
    assert chatml.decode(ids[-1:]) == "\n" and not mask[-1]


def test_a_chat_reply_cut_short_does_not_learn_the_end_of_turn(chatml):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the quick brown"}]
    for ending in ({"finish_reason": "length"}, {"finish_reason": "stop", "stop_reason": " fox"}):
        ids, mask = encode_row({"messages": messages, **ending}, chatml)
        assert _targets(chatml, ids, mask) == "the quick brown"
    ids, mask = encode_row({"messages": messages, "finish_reason": "stop"}, chatml)
    assert _targets(chatml, ids, mask) == "the quick brown<|im_end|>"


# ---------------------------------------------------------------- a server's chat completions -> cache -> train


@pytest.mark.slow  # a served teacher, generate, cache build and a training run: ~20 s on 2 cores
def test_chat_completions_of_a_server_build_a_generated_cache_and_train(tmp_path, chatml_dir, student_dir):
    """`distill serve` on a ChatML model as the OpenAI-compatible server; `distill generate` writes chat rows with
    top-k log-probs; `distill cache` with cache.source=generated builds from them; `distill train` trains."""
    import threading
    import time

    from conftest import llama_config
    from distill.cache.build import build_cache
    from distill.cache.reader import read_manifest
    from distill.config import recipe_from_dict
    from distill.generate.run import generate
    from distill.generate.server import bind, build_server, create_app, load_served_model
    from distill.models import load_tokenizer
    from distill.train.loop import train

    tokenizer = load_tokenizer(str(chatml_dir), "teacher")
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    teacher = save_model(llama_config(len(tokenizer)), None, chatml_dir, seed=3)  # eos 2 = <|im_end|>
    sock = bind("127.0.0.1", 0)
    server = build_server(create_app(load_served_model(str(teacher), "teacher", "float32", "cpu")))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    prompts = [{"messages": [{"role": "user", "content": text}]} for text in ("hello teacher", "for i in", "def add")]
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "generated.jsonl"
    try:
        generate(
            recipe_from_dict(
                {
                    "teacher": {"endpoint": f"http://127.0.0.1:{sock.getsockname()[1]}/v1", "model_name": "teacher"},
                    "generate": {
                        "prompts": str(prompts_file),
                        "output": str(out),
                        "max_new_tokens": 6,
                        "samples_per_prompt": 2,
                        "temperature": 1.0,
                        "logprobs": 3,
                    },
                }
            ),
            log=lambda _: None,
        )
    finally:
        server.should_exit = True
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["messages"][-1]["role"] == "assistant" and "prompt_ids" not in r for r in rows)
    content = {
        "teacher": {"path": str(teacher)},
        "student": {"path": str(student_dir), "tokenizer": str(teacher)},
        "data": {"train": str(out), "eval": str(out), "max_length": 64},
        "training": {"steps": 2, "batch_size": 2, "save_every": 10, "eval_every": 10, "log_every": 1},
        "cache": {"dir": str(tmp_path / "cache"), "source": "generated"},
        "report": {"enabled": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    manifest = read_manifest(build_cache(recipe_from_dict(content), log=lambda _: None, show_progress=False))
    # Every stored token is one the server wrote: the completion's tokens (its <|im_end|> when it ended there).
    produced = sum(len(r["completion_ids"]) for r in rows)
    assert 0 < manifest["data"]["loss_tokens"] <= produced and manifest["top_k"] == 3
    result = train(recipe_from_dict(content), log=lambda _: None, show_progress=False)
    assert result.summary["steps"] == 2 and result.summary["loss_tokens"] > 0
    assert (result.student_dir / "model.safetensors").is_file()


def test_local_rows_name_the_stop_string_they_stopped_at(tokenizer):
    from distill.generate.local import Completion
    from distill.generate.run import _stop_reason

    eos = tokenizer.eos_token_id
    ids = _ids(tokenizer, "hello world")
    stopped = Completion(text="hello", token_ids=ids, finish_reason="stop")
    assert _stop_reason(tokenizer, stopped, ["\n", " wor"], {eos}) == " wor"
    by_eos = Completion(text="hello world", token_ids=ids + [eos], finish_reason="stop")
    assert _stop_reason(tokenizer, by_eos, [" wor"], {eos}) is None
    cut = Completion(text="hello world", token_ids=ids, finish_reason="length")
    assert _stop_reason(tokenizer, cut, [" wor"], {eos}) is None
    # Such a row trains its tokens (the stop string's included) and no EOS after them.
    row = {"prompt_ids": [1], "completion_ids": ids, "finish_reason": "stop", "stop_reason": " wor"}
    assert encode_row(row, tokenizer)[0] == [1, *ids]
