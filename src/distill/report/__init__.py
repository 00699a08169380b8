"""How much of the teacher the student kept (`distill eval`, the end-of-run report).

evaluate.py    `evaluate_models`, top to bottom: which models -> the eval data -> cost and score each model -> report
quality.py     token metrics of a model against the labels and the teacher, from hidden states a chunk at a time
generation.py  the eval prompts generation checks continue; exact match of greedy continuations on prompt/answer rows
draft.py       each model as the teacher's speculative-decoding draft: acceptance (counted in transformers), speed-up
difficulty.py  eval tokens bucketed by the teacher's entropy (quartiles): metrics and retention per bucket
failures.py    failure modes: repetition and loops of greedy generations, length vs the teacher, calibration (ECE)
retention.py   retention and speed-up: each model's numbers divided by the teacher's
speed.py       prefill and decode tokens/s, weight bytes and size on disk
render.py      report.json / report.md / report.html and the PNG plots
judging.py     the tables and chart of the draft, difficulty and failure-mode sections
tasks.py       lm-eval-harness tasks (extra [tasks]) on each loaded model: score and retention per task
"""
