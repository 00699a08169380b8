"""How much of the teacher the student kept (`distill eval`, the end-of-run report).

evaluate.py    `evaluate_models`, top to bottom: which models -> the eval data -> cost and score each model -> report
quality.py     token metrics of a model against the labels and the teacher, from hidden states a chunk at a time
generation.py  exact match of greedy continuations on a prompt/answer file
retention.py   retention and speed-up: each model's numbers divided by the teacher's
speed.py       prefill and decode tokens/s, weight bytes and size on disk
render.py      report.json / report.md / report.html and the PNG plots
"""
