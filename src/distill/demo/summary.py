"""What `distill demo` tells its user: the numbers against the README's targets, a few line completions in words,
and the toolkit features the run used, all read from what actually ran (the report, the parsed recipes, the
pruning record), so none of it can go stale when the demo changes."""

from __future__ import annotations

from collections.abc import Sequence

TARGETS = {
    "params_ratio": 4.0,  # teacher params / student params
    "decode_speedup": 2.0,  # student decode tok/s / teacher decode tok/s (batch 1)
    "top1_accuracy_retention": 0.90,  # student next-token accuracy / teacher's
}

EXAMPLE_COUNT = 4
EXAMPLE_RULE = (
    "the rows the teacher completes exactly, in file order, then the other rows in file order "
    "(chosen by the teacher's result, never the student's)"
)
# Short names of the config keys pruning changes; any other key is shown as the config names it.
SHAPE_NAMES = {
    "num_hidden_layers": "layers",
    "hidden_size": "hidden",
    "intermediate_size": "MLP",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv heads",
}
LABELS = {"teacher": "teacher", "student": "distilled", "baseline": "hard labels", "pruned": "pruned init"}


def summarize(report: dict) -> dict:
    keys = ("params", "decode_tokens_per_s", "top1_accuracy", "cross_entropy", "agreement", "kl_to_teacher")
    models = {name: {k: m.get(k) for k in (*keys, "exact_match")} for name, m in report["models"].items()}
    return {**models, "retention": report["retention"], "speedup": report["speedup"]}


def check_targets(report: dict) -> dict:
    """The README's targets, measured: {name: {"value", "target", "met"}}."""
    m, student, baseline = report["models"], report["models"]["student"], report["models"]["baseline"]
    speed = report["speedup"]["student"].get("decode")
    checks = {
        "params_ratio": (m["teacher"]["params"] / student["params"], TARGETS["params_ratio"], True),
        "decode_speedup": (speed, TARGETS["decode_speedup"], True),
        "top1_accuracy_retention": (
            report["retention"]["student"]["top1_accuracy"],
            TARGETS["top1_accuracy_retention"],
            True,
        ),
        # Lower is better: the student's value must be below the baseline's.
        "cross_entropy_vs_baseline": (student["cross_entropy"], baseline["cross_entropy"], False),
        "agreement_vs_baseline": (student["agreement"], baseline["agreement"], True),
    }
    result = {}
    for name, (value, target, higher) in checks.items():
        met = None if value is None else (value >= target if higher else value < target)
        result[name] = {"value": value, "target": target, "met": met}
    return result


# ---------------------------------------------------------------- line completions in words


def completion_examples(rows: Sequence[dict], completions: dict[str, list[dict]], count: int = EXAMPLE_COUNT) -> dict:
    """`count` line-completion rows side by side, picked by EXAMPLE_RULE.

    `rows`: the completion file's {"prompt", "answer"} rows; `completions`: {model: the outputs and matches that
    measured its exact match, in row order} (`exact_match(keep_outputs=True)`), the teacher's among them. Nothing
    is decoded again, so every ✓ shown is one the exact-match figure counted."""
    teacher = completions["teacher"]
    order = [i for i in range(len(rows)) if teacher[i]["match"]]
    order += [i for i in range(len(rows)) if not teacher[i]["match"]]
    shown = []
    for i in order[:count]:
        shown.append(
            {
                "row": i,
                "context_last_line": rows[i]["prompt"].split("\n")[-1].rstrip(),
                "answer": rows[i]["answer"],
                "completions": {name: outputs[i] for name, outputs in completions.items()},
            }
        )
    exact = {name: sum(c["match"] for c in outputs) for name, outputs in completions.items()}
    return {"rule": EXAMPLE_RULE, "rows": len(rows), "exact": exact, "examples": shown}


def completion_lines(examples: dict, width: int = 60) -> list[str]:
    """The examples as plain text lines: the context's last line, the true next line, each model's line."""
    lines = [
        f"line completions on held-out code: {len(examples['examples'])} of {examples['rows']} rows, "
        f"{examples['rule']}; ✓ = exact match"
    ]
    for number, example in enumerate(examples["examples"], 1):
        lines.append(f"  {number}. after    {_clip(example['context_last_line'], width)}")
        lines.append(f"     true     {_clip(example['answer'], width)}")
        for name, completion in example["completions"].items():
            mark = "✓" if completion["match"] else " "
            lines.append(f"     {LABELS.get(name, name):<12} {mark} {_clip(completion['output'].strip(), width)}")
    counts = ", ".join(f"{LABELS.get(n, n)} {k}/{examples['rows']}" for n, k in examples["exact"].items())
    lines.append(f"  exact on all rows: {counts}")
    return lines


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------- features used


def used_features(pruned: dict, distilled, baseline) -> dict:
    """The toolkit features the demo ran, from the pruning record and the two parsed recipes (`config.Recipe`)."""
    search = pruned.get("layer_search")
    if search:
        layers = f"kept by KL to the teacher ({search['method']} search, {search['forward_passes']} teacher passes)"
    else:
        layers = "spread evenly (no calibration KL search)"
    objective, training, data = distilled.objective, distilled.training, distilled.data
    different = _differences(distilled.model_dump(), baseline.model_dump(), skip={"output"})
    return {
        "student": {
            "pruned_from_teacher": True,
            "kept_layers": pruned["kept_layers"],
            "layer_choice": layers,
            "shape": pruned["config_diff"],
        },
        "teacher_signals": f"cache {distilled.teacher.cache}" if distilled.teacher.cache else "teacher run live",
        "objective": {
            "divergence": objective.divergence,
            "temperature": objective.temperature,
            "kd_weight": objective.kd_weight,
            "ce_weight": objective.ce_weight,
            "fused_loss": objective.fused,
            "on_policy_share": objective.on_policy.lambda_,
            "hidden_state_weight": objective.hidden.weight,
        },
        "training": {
            "steps": training.steps,
            "batch_size": training.batch_size,
            "max_length": data.max_length,
            "packing": data.packing,
            "lr": training.lr,
            "schedule": training.schedule,
            "warmup_steps": training.warmup_steps,
        },
        "baseline_differs_in": different,
    }


def _differences(a: dict, b: dict, skip: set[str], prefix: str = "") -> dict:
    """{dotted key: b's value} wherever the nested dicts `a` and `b` differ."""
    found = {}
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found.update(_differences(left, right, set(), f"{prefix}{key}."))
        elif left != right:
            found[f"{prefix}{key}"] = right
    return found


def feature_lines(features: dict) -> list[str]:
    """The features as plain sentences."""
    student, objective, training = features["student"], features["objective"], features["training"]
    shape = ", ".join(f"{SHAPE_NAMES.get(k, k)} {a}->{b}" for k, (a, b) in student["shape"].items())
    extras = [
        "fused chunked loss" if objective["fused_loss"] else "dense loss",
        f"on-policy share {objective['on_policy_share']:g}" if objective["on_policy_share"] else "off-policy",
    ]
    if objective["hidden_state_weight"]:
        extras.append(f"hidden-state term weight {objective['hidden_state_weight']:g}")
    baseline = ", ".join(f"{k} {v}" for k, v in features["baseline_differs_in"].items()) or "nothing"
    return [
        "what this demo used (read from the recipes and the pruning record it ran):",
        f"  student: pruned from the teacher ({shape}); layers {student['kept_layers']} {student['layer_choice']}",
        f"  objective: {objective['divergence']} at temperature {objective['temperature']:g}, kd_weight "
        f"{objective['kd_weight']:g}, ce_weight {objective['ce_weight']:g}, {', '.join(extras)}; "
        f"{features['teacher_signals']}",
        f"  training: {training['steps']} steps x {training['batch_size']} x {training['max_length']} tokens"
        f"{' packed' if training['packing'] else ''}, lr {training['lr']:g} {training['schedule']}, "
        f"{training['warmup_steps']} warmup steps",
        f"  baseline: the same recipe but {baseline}",
    ]


# ---------------------------------------------------------------- printing


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    s = result["summary"]
    table = Table(title=f"distill demo: {result['steps']} steps each, held-out stdlib modules")
    for column in ("model", "params", "decode tok/s", "next-tok acc", "CE", "agree", "line EM"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, label in LABELS.items():
        m = s.get(name)
        if m is None:
            continue
        table.add_row(
            label,
            f"{m['params'] / 1e6:.2f}M",
            "-" if m["decode_tokens_per_s"] is None else f"{m['decode_tokens_per_s']:.0f}",
            f"{m['top1_accuracy']:.1%}",
            f"{m['cross_entropy']:.3f}",
            f"{m['agreement']:.1%}",
            "-" if m.get("exact_match") is None else f"{m['exact_match']:.1%}",
        )
    console = Console()
    console.print(table)
    r = s["retention"]["student"]
    console.print(
        f"student keeps {r['top1_accuracy']:.0%} of the teacher's next-token accuracy, {r['agreement']:.0%} "
        f"agreement, CE retention {r['cross_entropy']:.0%}"
    )
    for name, t in result["targets"].items():
        mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        console.print(f"  {name}: {value} (target {t['target']:.3f}) {mark}")
    # Plain Text: code is full of [brackets] and :names: that rich would read as markup and emoji.
    for line in [*completion_lines(result["completion_examples"]), *feature_lines(result["features"])]:
        console.print(Text(line))
