"""Depth pruning: which layers to keep, by KL search, block influence or uniform spread, against the best subset.

demo  the shipped demo teacher (6 layers): for every depth k, the layers each selection keeps, chosen on the demo's
      calibration data exactly as `distill student` does, and their KL to the teacher on held-out modules the teacher
      never saw (distill.demo.corpus.HELD_OUT), next to the best of all C(6, k) subsets on that held-out data.
cost  a real-shaped deeper config with random weights (default SmolLM2-135M: 30 layers, hidden 576, 9/3 heads,
      vocabulary 49152, tied): wall time and forward passes of the KL search down to --keep layers.

    python benchmarks/layer_selection.py demo [--keep 3] [--search-tokens 2048] [--heldout-tokens 4096]
    python benchmarks/layer_selection.py cost [--layers 30 --keep 15 --tokens 128]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from pathlib import Path

import torch


def _memo(score):
    """Scores each subset once: the table reuses subsets the searches already scored (their pass counts are the
    searches' own, see LayerSearch)."""
    seen = {}

    def cached(kept):
        key = tuple(kept)
        if key not in seen:
            seen[key] = score(kept)
        return seen[key]

    return cached


def demo(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data import build_examples
    from distill.demo.run import TEACHER_DIR, write_data
    from distill.student.depth import CalibrationKL, search_layers
    from distill.student.importance import activation_importance
    from distill.student.slicing import layers_by_influence
    from distill.student.target import uniform_layers

    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    # float32 on a CPU, as build_student measures (bfloat16 matmuls are ~5x slower there).
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()
    total = teacher.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        # The demo's own files: calibration = a subset of the teacher's training files, eval = held-out modules.
        data = write_data(Path(tmp), eval_rows=args.heldout_rows, completion_rows=0)
        calibration = [e.input_ids for e in build_examples(data["calibration"], tokenizer, 512, packing=True)[0]]
        heldout = [e.input_ids for e in build_examples(data["eval"], tokenizer, 512, packing=True)[0]]

    start = time.perf_counter()
    influence = activation_importance(teacher, calibration, 8192, teacher.config.head_dim).block_influence
    calib = CalibrationKL(teacher, calibration, args.search_tokens)
    held = CalibrationKL(teacher, heldout, args.heldout_tokens)
    held_kl = _memo(held)
    calib_kl = _memo(calib)
    print(f"# demo teacher, {total} layers; calibration {calib.tokens} tokens, held-out {held.tokens} tokens")
    print("# block influence per layer: " + ", ".join(f"{v:.3f}" for v in influence))
    header = "| keep | best on held-out (KL) | kl: layers, KL, x best, search | influence | uniform |"
    print(header)
    print("|---|---|---|---|---|")
    keeps = [args.keep] if args.keep else list(range(1, total))
    for k in keeps:
        subsets = [list(c) for c in itertools.combinations(range(total), k)]
        best = min(subsets, key=held_kl)
        found = search_layers(calib_kl, total, k)
        choices = {
            "kl": found.kept,
            "influence": layers_by_influence(influence, k),
            "uniform": uniform_layers(total, k),
        }
        cells = []
        for name, kept in choices.items():
            ratio = held_kl(kept) / held_kl(best)
            cell = f"{kept} {held_kl(kept):.4f} ({ratio:.2f}x)"
            if name == "kl":
                cell += f", {found.method} {found.passes} passes"
            cells.append(cell)
        print(f"| {total} → {k} | {best} {held_kl(best):.4f} | " + " | ".join(cells) + " |")
    print(
        f"# {time.perf_counter() - start:.0f} s on {platform.machine()} {platform.processor() or ''}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )


def cost(args) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distill.student.depth import CalibrationKL, exhaustive_cost, greedy_cost, search_layers

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, args.vocab, (max(1, args.tokens // args.length), args.length), generator=generator)
    start = time.perf_counter()
    score = CalibrationKL(model, rows.tolist(), args.tokens)
    setup = time.perf_counter() - start
    with torch.no_grad():
        ids = rows[:1]
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        teacher_pass = (time.perf_counter() - t0) * len(rows)
    start = time.perf_counter()
    found = search_layers(score, args.layers, args.keep, args.search)
    seconds = time.perf_counter() - start
    print(
        f"# random-weight Llama, {params / 1e6:.1f}M params: {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, tied; calibration {score.tokens} tokens"
    )
    print("| search | layers | subsets scored (passes) | layer forwards | full-teacher equivalents | time | per pass |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {found.method} | {args.layers} → {args.keep} | {found.passes} | {found.layer_forwards} | "
        f"{found.layer_forwards / args.layers:.0f} | {seconds:.0f} s | {seconds / found.passes:.2f} s |"
    )
    subsets = exhaustive_cost(args.layers, args.keep) // args.keep
    print(
        f"# one full-teacher pass over the calibration tokens: {teacher_pass:.2f} s (setup with teacher log-probs "
        f"{setup:.1f} s); exhaustive would score C({args.layers}, {args.keep}) = {subsets:,} subsets "
        f"({exhaustive_cost(args.layers, args.keep):,} layer forwards vs greedy "
        f"{greedy_cost(args.layers, args.keep):,})"
    )
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part", required=True)
    d = parts.add_parser("demo")
    d.add_argument("--keep", type=int, help="one depth only (default: every depth 1..L-1)")
    d.add_argument("--search-tokens", type=int, default=2048, help="calibration tokens (build_student's default)")
    d.add_argument("--heldout-tokens", type=int, default=4096)
    d.add_argument("--heldout-rows", type=int, default=96, help="24-line blocks spread over the held-out modules")
    c = parts.add_parser("cost")
    c.add_argument("--layers", type=int, default=30)
    c.add_argument("--keep", type=int, default=15)
    c.add_argument("--hidden", type=int, default=576)
    c.add_argument("--intermediate", type=int, default=1536)
    c.add_argument("--heads", type=int, default=9)
    c.add_argument("--kv-heads", type=int, default=3)
    c.add_argument("--vocab", type=int, default=49152)
    c.add_argument("--tokens", type=int, default=128, help="calibration tokens")
    c.add_argument("--length", type=int, default=128, help="tokens per calibration sequence")
    c.add_argument("--search", default="auto", choices=["auto", "exhaustive", "greedy"])
    args = parser.parse_args()
    demo(args) if args.part == "demo" else cost(args)


if __name__ == "__main__":
    main()
