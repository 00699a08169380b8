"""The report's sections on the models as they will be used: as the teacher's draft, by difficulty, failure modes.

Tables as (title, header, rows) of strings, which render.py writes into report.md and report.html beside its own,
and the difficulty chart (a matplotlib figure; render.py turns it into the PNG).
"""

from __future__ import annotations


def _percent(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _float(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _times(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def draft_table(report: dict) -> tuple[str, list[str], list[list[str]]] | None:
    """Acceptance, tokens per teacher forward and speed-up of each model as the teacher's draft."""
    rows = []
    for name, result in report["models"].items():
        if name == "teacher" or "draft_acceptance_rate" not in result:
            continue
        d = result.get("draft") or {}
        equal = d.get("outputs_equal_teacher")
        check = (
            result.get("draft_note", "–")
            if equal is None
            else ("yes" if equal else f"no ({d['prompts_equal_teacher']}/{d['prompts']})")
        )
        rows.append(
            [
                name,
                _percent(result["draft_acceptance_rate"]),
                _float(d.get("tokens_per_teacher_forward"), 2),
                _times(result.get("speculative_decode_speedup")),
                _float(d.get("teacher_tokens_per_s"), 1),
                _float(d.get("assisted_tokens_per_s"), 1),
                check,
            ]
        )
    if not rows:
        return None
    some = next((r.get("draft") for r in report["models"].values() if r.get("draft")), None)
    how = (
        f" ({some['prompts']} prompts × {some['new_tokens']} tokens, {some['draft_tokens']} drafted per round)"
        if some
        else ""
    )
    header = ["model", "acceptance", "tokens / teacher forward", "speed-up", "teacher tok/s", "with draft tok/s"]
    return (f"As the teacher's draft: greedy speculative decoding{how}", [*header, "output = teacher's"], rows)


def difficulty_table(report: dict) -> tuple[str, list[str], list[list[str]]] | None:
    """Per model and teacher-entropy bucket: tokens, top-1 accuracy, agreement, KL and retention."""
    by_difficulty = report.get("by_difficulty") or {}
    rows = []
    for name, buckets in by_difficulty.items():
        for b in buckets:
            kept = b.get("retention") or {}
            rows.append(
                [
                    name,
                    f"Q{b['bucket']} ({b['teacher_entropy_low']:.2f}–{b['teacher_entropy_high']:.2f})",
                    f"{b['tokens']:,}",
                    _percent(b["top1_accuracy"]),
                    _percent(b["agreement"]),
                    _float(b["kl_to_teacher"], 4),
                    _percent(kept.get("top1_accuracy")),
                    _percent(kept.get("cross_entropy")),
                ]
            )
    if not rows:
        return None
    header = ["model", "teacher entropy (nats)", "tokens", "top-1 acc.", "agreement", "KL(teacher‖model)"]
    title = "Retention by difficulty: tokens split at the quartiles of the teacher's entropy (Q1 = most certain)"
    return (title, [*header, "top-1 retention", "CE retention"], rows)


def failure_table(report: dict) -> tuple[str, list[str], list[list[str]]] | None:
    """Repetition, loops, length against the teacher's and calibration of each model."""
    rows, n, some = [], None, None
    for name, result in report["models"].items():
        f = result.get("failure_modes")
        if not f:
            continue
        n, some = f.get("ngram", n), f if f.get("generations") else some
        generated = [
            _percent(f.get("repeated_ngram_share")),
            _percent(f.get("looping_share")),
            _percent(f.get("ended_share")),
            _float(f.get("mean_generated_tokens"), 1),
            _percent(f.get("length_ratio_to_teacher")),
        ]
        rows.append(
            [name, *(generated if f.get("generations") else ["–"] * 5), _float(f.get("expected_calibration_error"), 4)]
        )
    if not rows:
        return None
    how = f" ({some['generations']} greedy generations of up to {some['max_new_tokens']} tokens)" if some else ""
    header = ["model", f"repeated {n}-grams", "looping", "ended at EOS", "mean tokens", "length vs teacher"]
    return (f"Failure modes{how}", [*header, "ECE (top-1)"], rows)


def judging_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    return [t for t in (draft_table(report), difficulty_table(report), failure_table(report)) if t is not None]


def difficulty_figure(report: dict, plt):
    """Top-1 accuracy retention and KL(teacher ‖ model) per teacher-entropy bucket, one series per model."""
    by_difficulty = report.get("by_difficulty") or {}
    models = {name: buckets for name, buckets in by_difficulty.items() if name != "teacher"}
    if plt is None or not models:
        return None
    first = next(iter(by_difficulty.values()))
    labels = [f"Q{b['bucket']}\n{b['teacher_entropy_low']:.2f}–{b['teacher_entropy_high']:.2f}" for b in first]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(models)
    for i, (name, buckets) in enumerate(models.items()):
        positions = [j + (i - (len(models) - 1) / 2) * width for j in range(len(buckets))]
        kept = [100.0 * ((b.get("retention") or {}).get("top1_accuracy") or 0.0) for b in buckets]
        bars = left.bar(positions, kept, width, label=name)
        left.bar_label(bars, fmt="%.0f%%", fontsize=7)
        right.plot(range(len(buckets)), [b["kl_to_teacher"] for b in buckets], marker="o", label=name)
    left.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
    left.set_title("top-1 accuracy retention by difficulty", fontsize=10)
    left.set_ylabel("% of the teacher's top-1 accuracy")
    right.set_title("KL(teacher ‖ model) by difficulty", fontsize=10)
    right.set_ylabel("nats per token")
    for axis in (left, right):
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
        axis.set_xlabel("teacher entropy bucket (nats)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    # One legend for both panels, below them, so it covers no bar.
    handles, names = right.get_legend_handles_labels()
    figure.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(names), 6), fontsize=8)
    return figure
