"""Student by pruning (distill.student.build): tiny random teachers of every supported architecture, no network.

The strongest checks are exact: keeping everything must reproduce the teacher, and pruning away structure that is
dead by construction (a layer whose output equals its input, MLP neurons with zero up_proj rows, embedding channels
nothing writes to, heads whose values are zero) must not change the logits. Those only pass if every weight is
sliced along the right axis and the importance scores find the dead parts.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CORPUS, llama_config, qwen2_config, write_jsonl
from distill.errors import DistillError
from distill.student.build import build_student, resolve_target

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4, 64, 128, 4, 2, 16
USELESS_LAYER = 2  # uniform selection of 3 out of 4 keeps [0, 2, 3], so only importance drops this one
DEAD_CHANNELS = list(range(16))  # of 64
DEAD_NEURONS = list(range(0, INTER, 2))  # half of them, interleaved so "keep the first ones" would fail


def _common(vocab_size: int, **extra) -> dict:
    values = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(extra)
    return values


def qwen3_config(vocab_size: int, **extra):
    from transformers import Qwen3Config

    return Qwen3Config(**_common(vocab_size, **extra))


def mistral_config(vocab_size: int, **extra):
    from transformers import MistralConfig

    return MistralConfig(**_common(vocab_size, **extra))


def gemma_config(vocab_size: int, **extra):
    from transformers import GemmaConfig

    return GemmaConfig(**_common(vocab_size, **extra))


def gemma2_config(vocab_size: int, **extra):
    from transformers import Gemma2Config

    # Sliding and full attention alternate, so layer_types must follow the kept layers.
    return Gemma2Config(**_common(vocab_size, query_pre_attn_scalar=HEAD_DIM, sliding_window=4, **extra))


def gemma3_config(vocab_size: int, **extra):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_common(vocab_size, query_pre_attn_scalar=HEAD_DIM, sliding_window=4, **extra))


CONFIGS = {
    "llama": lambda v: llama_config(v, hidden=HIDDEN, layers=LAYERS),
    # Sliding window on the last two layers gives layer_types [full, full, sliding, sliding].
    "qwen2": lambda v: qwen2_config(
        v, hidden=HIDDEN, layers=LAYERS, use_sliding_window=True, sliding_window=4, max_window_layers=2
    ),
    "qwen3": qwen3_config,
    "mistral": mistral_config,
    "gemma": gemma_config,
    "gemma2": gemma2_config,
    "gemma3_text": gemma3_config,
}


# ---------------------------------------------------------------- helpers


def _model(config, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def _deaden(model, *, layer=None, channels=(), neurons=(), v_heads=()):
    """Make parts of the teacher dead, so that removing them cannot change its outputs."""
    layers = model.model.layers
    if layer is not None:
        # Nothing reaches the residual stream: the layer's output equals its input (block influence 0).
        layers[layer].self_attn.o_proj.weight.zero_()
        layers[layer].mlp.down_proj.weight.zero_()
    if channels:
        # Channels nothing writes to stay zero in the residual stream all the way to the final norm.
        channels = list(channels)
        model.model.embed_tokens.weight[:, channels] = 0
        for block in layers:
            block.self_attn.o_proj.weight[channels, :] = 0
            block.mlp.down_proj.weight[channels, :] = 0
    for block in layers:
        if neurons:
            block.mlp.up_proj.weight[list(neurons), :] = 0  # act(gate) * 0 = 0 exactly
        for h in v_heads:
            block.self_attn.v_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM, :] = 0  # the head outputs zeros
    return model


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, T, V)


def _quiet(*_):
    pass


def _pruning_record(folder) -> dict:
    return json.loads((folder / "pruning.json").read_text())


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    rows = [{"text": f"{line} {i}"} for i, line in enumerate(CORPUS * 2)]
    return write_jsonl(tmp_path_factory.mktemp("calibration") / "calibration.jsonl", rows)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor([tokenizer("def add(a, b): the quick brown fox jumps over the lazy dog")["input_ids"]])


# ---------------------------------------------------------------- every architecture


@pytest.fixture(scope="module", params=list(CONFIGS))
def dead_teacher(request, tokenizer, tmp_path_factory):
    """(architecture, config, folder) of a teacher with a useless layer, dead channels and dead neurons."""
    config = CONFIGS[request.param](len(tokenizer))
    # RMSNorm's epsilon is added to a mean over fewer channels in the student; with the tiny activations of a
    # random model the default 1e-6 would show up as ~1e-4 differences in the logits.
    config.rms_norm_eps = 1e-12
    teacher = _deaden(_model(config), layer=USELESS_LAYER, channels=DEAD_CHANNELS, neurons=DEAD_NEURONS)
    return request.param, config, _save(teacher, tokenizer, tmp_path_factory.mktemp(request.param))


def test_keeping_everything_reproduces_the_teacher(dead_teacher, tmp_path, ids):
    _, _, teacher_dir = dead_teacher
    expected = _logits(teacher_dir, ids)

    depth = build_student(teacher_dir, tmp_path / "depth", layers=LAYERS, log=_quiet)
    assert depth["kept_layers"] == list(range(LAYERS))
    torch.testing.assert_close(_logits(tmp_path / "depth", ids), expected, rtol=0, atol=1e-6)

    width = build_student(
        teacher_dir, tmp_path / "width", hidden_size=HIDDEN, intermediate_size=INTER, heads=HEADS, log=_quiet
    )
    assert width["student_params"] == width["teacher_params"]
    torch.testing.assert_close(_logits(tmp_path / "width", ids), expected, rtol=0, atol=1e-6)


def test_pruning_dead_structure_is_lossless(dead_teacher, tokenizer, tmp_path, ids, calibration):
    _, config, teacher_dir = dead_teacher
    out = tmp_path / "student"
    hidden, inter = HIDDEN - len(DEAD_CHANNELS), INTER - len(DEAD_NEURONS)

    summary = build_student(
        teacher_dir,
        out,
        layers=LAYERS - 1,
        hidden_size=hidden,
        intermediate_size=inter,
        calibration=calibration,
        log=_quiet,
    )

    assert summary["kept_layers"] == [i for i in range(LAYERS) if i != USELESS_LAYER]
    influence = summary["block_influence"]
    assert influence[USELESS_LAYER] < 1e-5 < min(v for i, v in enumerate(influence) if i != USELESS_LAYER)
    record = _pruning_record(out)
    assert record["importance"] == "activations"
    assert record["kept_hidden_channels"] == list(range(len(DEAD_CHANNELS), HIDDEN))
    alive = [i for i in range(INTER) if i not in DEAD_NEURONS]
    assert record["kept_neurons"] == [alive] * (LAYERS - 1)

    student = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, nothing of ours
    assert student.config.model_type == config.model_type
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (LAYERS - 1, hidden, inter)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    if getattr(config, "layer_types", None) is not None:
        assert cfg.layer_types == [config.layer_types[i] for i in summary["kept_layers"]]
    layer = student.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (HEADS * HEAD_DIM, hidden)
    assert layer.self_attn.k_proj.weight.shape == (KV_HEADS * HEAD_DIM, hidden)
    assert layer.mlp.down_proj.weight.shape == (hidden, inter)
    assert student.model.embed_tokens.weight.shape == (len(tokenizer), hidden)
    assert sum(p.numel() for p in student.parameters()) == summary["student_params"] < summary["teacher_params"]

    with torch.no_grad():
        got = student(input_ids=ids).logits  # (1, T, V)
    assert got.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(got, _logits(teacher_dir, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- importance


@pytest.fixture(scope="module")
def dead_llama_dir(tmp_path_factory, tokenizer):
    teacher = _deaden(_model(CONFIGS["llama"](len(tokenizer))), layer=USELESS_LAYER)
    return _save(teacher, tokenizer, tmp_path_factory.mktemp("dead-llama"))


def test_without_calibration_layers_are_uniform(dead_llama_dir, tmp_path, calibration):
    no_data = build_student(dead_llama_dir, tmp_path / "a", layers=3, log=_quiet)
    assert no_data["kept_layers"] == [0, 2, 3]
    assert no_data["block_influence"] is None
    forced = build_student(
        dead_llama_dir, tmp_path / "b", layers=3, calibration=calibration, layer_selection="uniform", log=_quiet
    )
    assert forced["kept_layers"] == [0, 2, 3]
    assert build_student(dead_llama_dir, tmp_path / "c", layers=2, log=_quiet)["kept_layers"] == [0, 3]


def test_generation_with_kv_cache_after_dropping_a_layer(dead_llama_dir, tmp_path, calibration, ids):
    # Attention modules index the KV cache by layer_idx; a wrong index would break cached decoding.
    build_student(dead_llama_dir, tmp_path / "s", layers=3, calibration=calibration, log=_quiet)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = student.generate(ids, use_cache=True, **kwargs)
    uncached = student.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_width_uses_activations_with_calibration_and_weights_without(tokenizer, tmp_path, calibration):
    # Neurons 0..63: tiny gate/up (so tiny activations) but a huge down_proj (so a large weight-magnitude score).
    model = _model(CONFIGS["llama"](len(tokenizer)))
    quiet = list(range(INTER // 2))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[quiet] *= 0.1
            layer.mlp.up_proj.weight[quiet] *= 0.1
            layer.mlp.down_proj.weight[:, quiet] *= 1e4
    teacher_dir = _save(model, tokenizer, tmp_path / "teacher")

    build_student(teacher_dir, tmp_path / "act", intermediate_size=INTER // 2, calibration=calibration, log=_quiet)
    build_student(teacher_dir, tmp_path / "wt", intermediate_size=INTER // 2, log=_quiet)

    loud = list(range(INTER // 2, INTER))
    assert _pruning_record(tmp_path / "act")["kept_neurons"] == [loud] * LAYERS
    record = _pruning_record(tmp_path / "wt")
    assert record["importance"] == "weights"
    assert record["kept_neurons"] == [quiet] * LAYERS


# ---------------------------------------------------------------- attention heads and GQA


def test_dropping_dead_heads_is_lossless_without_gqa(tokenizer, tmp_path, calibration, ids):
    from transformers import LlamaConfig

    config = LlamaConfig(**_common(len(tokenizer), num_key_value_heads=HEADS))  # one KV head per query head
    teacher_dir = _save(_deaden(_model(config), v_heads=[1, 2]), tokenizer, tmp_path / "teacher")
    summary = build_student(teacher_dir, tmp_path / "s", heads=2, calibration=calibration, log=_quiet)
    record = _pruning_record(tmp_path / "s")
    assert record["kept_heads"] == [[0, 3]] * LAYERS
    assert record["kept_kv_heads"] == [[0, 3]] * LAYERS
    assert summary["config_diff"]["num_key_value_heads"] == [4, 2]
    torch.testing.assert_close(_logits(tmp_path / "s", ids), _logits(teacher_dir, ids), rtol=0, atol=1e-5)


def test_gqa_keeps_every_kv_head_when_it_can(tokenizer, tmp_path, calibration, ids):
    teacher_dir = _save(_model(CONFIGS["qwen2"](len(tokenizer))), tokenizer, tmp_path / "teacher")
    build_student(teacher_dir, tmp_path / "s", heads=2, calibration=calibration, log=_quiet)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 2)
    assert student.model.layers[0].self_attn.q_proj.bias.shape == (2 * HEAD_DIM,)
    for heads in _pruning_record(tmp_path / "s")["kept_heads"]:
        # one query head from each group of two, so head j still reads KV head j
        assert len(heads) == 2 and heads[0] in (0, 1) and heads[1] in (2, 3)
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()


@pytest.mark.parametrize(
    ("teacher_heads", "teacher_kv", "heads", "expected"),
    [(8, 4, 4, (4, 4)), (8, 4, 2, (2, 1)), (8, 4, 6, (6, 3)), (8, 8, 3, (3, 3)), (8, 1, 3, (3, 1))],
)
def test_gqa_head_rule(teacher_heads, teacher_kv, heads, expected):
    from transformers import LlamaConfig

    # hidden 96 is a multiple of every head count used, which transformers demands of Llama configs.
    values = _common(64, hidden_size=96, num_attention_heads=teacher_heads, num_key_value_heads=teacher_kv, head_dim=8)
    config = LlamaConfig(**values)
    student = resolve_target(config, heads=heads)
    assert (student.num_attention_heads, student.num_key_value_heads) == expected
    assert student.head_dim == 8
    assert student.num_attention_heads % student.num_key_value_heads == 0


def test_heads_that_do_not_fit_gqa_are_refused():
    from transformers import LlamaConfig

    config = LlamaConfig(**_common(64, num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    with pytest.raises(DistillError, match="grouped-query"):
        resolve_target(config, heads=3)


# ---------------------------------------------------------------- parameter budgets


def _count(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


@pytest.fixture(scope="module")
def wide_llama():
    # Wider than the others so the 8-channel grid of sizes is fine enough to hit a budget closely.
    return llama_config(512, hidden=256, layers=8)


def test_moderate_budget_prunes_width_and_keeps_depth(wide_llama):
    student = resolve_target(wide_llama, params="0.5x")
    assert abs(_count(student) / _count(wide_llama) - 0.5) < 0.03
    assert student.num_hidden_layers == wide_llama.num_hidden_layers
    assert student.num_attention_heads == wide_llama.num_attention_heads
    assert student.hidden_size < wide_llama.hidden_size and student.hidden_size % 8 == 0
    # hidden and intermediate shrink together
    assert student.intermediate_size / wide_llama.intermediate_size == pytest.approx(
        student.hidden_size / wide_llama.hidden_size, abs=0.05
    )


def test_aggressive_budget_also_drops_layers(wide_llama):
    student = resolve_target(wide_llama, params="0.15x")
    assert abs(_count(student) / _count(wide_llama) - 0.15) < 0.03
    assert student.num_hidden_layers < wide_llama.num_hidden_layers
    assert student.hidden_size >= wide_llama.hidden_size // 2


def test_absolute_budget_and_explicit_sizes_combine(wide_llama):
    student = resolve_target(wide_llama, params="1.5M", layers=6)
    assert student.num_hidden_layers == 6
    assert abs(_count(student) - 1.5e6) < 0.03 * _count(wide_llama)
    fixed_hidden = resolve_target(wide_llama, params=0.5, hidden_size=192)
    assert fixed_hidden.hidden_size == 192
    assert fixed_hidden.intermediate_size < wide_llama.intermediate_size


def test_budget_build_matches_the_plan(dead_llama_dir, tmp_path, calibration):
    summary = build_student(dead_llama_dir, tmp_path / "s", params="0.6x", calibration=calibration, log=_quiet)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert sum(p.numel() for p in student.parameters()) == summary["student_params"]
    # a coarse grid of sizes in a model this small (hidden moves in steps of 8 out of 64)
    assert abs(summary["student_params"] / summary["teacher_params"] - 0.6) < 0.06


# ---------------------------------------------------------------- tied embeddings and Gemma's embedding scale


def _safetensors_keys(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_tied_embeddings_stay_tied(tokenizer, tmp_path, calibration):
    config = CONFIGS["llama"](len(tokenizer))
    config.tie_word_embeddings = True
    teacher_dir = _save(_model(config), tokenizer, tmp_path / "teacher")
    build_student(teacher_dir, tmp_path / "s", hidden_size=48, calibration=calibration, log=_quiet)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in _safetensors_keys(tmp_path / "s")


def test_gemma_embedding_scale_is_preserved_and_stays_tied(tokenizer, tmp_path, calibration, ids):
    teacher_dir = _save(_model(CONFIGS["gemma"](len(tokenizer))), tokenizer, tmp_path / "teacher")
    build_student(teacher_dir, tmp_path / "s", hidden_size=32, calibration=calibration, log=_quiet)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    record = _pruning_record(tmp_path / "s")
    kept = record["kept_hidden_channels"]
    with torch.no_grad():
        # Gemma multiplies by sqrt(hidden_size): sqrt(32) here, sqrt(64) in the teacher; the inputs must agree.
        torch.testing.assert_close(student.model.embed_tokens(ids), teacher.model.embed_tokens(ids)[..., kept])
        # tied: the final norm is left alone so the logits keep the teacher's scale
        torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight[kept])
    assert record["hidden_rescale"] == pytest.approx(2**0.5)
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------- the output folder and bad input


def test_output_folder(dead_llama_dir, tmp_path, tokenizer):
    out = tmp_path / "student"
    out.mkdir()  # an empty folder is fine
    lines = []
    build_student(dead_llama_dir, out, layers=2, log=lines.append)
    assert lines[0].startswith("student (llama): layers 4 -> 2")
    assert {"config.json", "model.safetensors", "pruning.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary folder left behind
    record = _pruning_record(out)
    assert record["kept_layers"] == [0, 3] and record["config_diff"]["num_hidden_layers"] == [4, 2]
    with pytest.raises(DistillError, match="not empty"):
        build_student(dead_llama_dir, out, layers=2, log=_quiet)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ({"layers": 5}, "between 1 and the teacher's 4"),
        ({"layers": 0}, "between 1"),
        ({"hidden_size": 65}, "between 1 and the teacher's 64"),
        ({"intermediate_size": 256}, "intermediate_size"),
        ({"hidden_size": 62}, "not a multiple of the number of attention heads"),
        ({"heads": 3}, "grouped-query"),
        ({"params": "2x"}, "more than the teacher"),
        ({"params": "10"}, "below the smallest student"),
        ({"params": "lots"}, "expected a share"),
        ({"params": "0.5x", "layers": 3, "hidden_size": 32, "intermediate_size": 64}, "all given"),
        ({}, "say how small"),
    ],
)
def test_impossible_targets(targets, message, tokenizer):
    with pytest.raises(DistillError, match=message) as info:
        resolve_target(CONFIGS["llama"](len(tokenizer)), **targets)
    assert "\n" not in str(info.value)


def test_unsupported_architecture_is_named(tokenizer, tmp_path):
    from transformers import GPT2Config

    with pytest.raises(DistillError, match="'gpt2'.*unknown parameters"):
        resolve_target(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64), layers=1)
    teacher_dir = _save(
        _model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))), tokenizer, tmp_path
    )
    with pytest.raises(DistillError, match="gpt2"):
        build_student(teacher_dir, tmp_path / "s", layers=1, log=_quiet)
    assert not (tmp_path / "s").exists()
