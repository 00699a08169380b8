"""How much of the teacher the student kept (`distill eval`, the end-of-run report).

evaluate.py  token metrics of every model against the labels and the teacher, exact match, retention, speed-up
speed.py     prefill and decode tokens/s, weight bytes and size on disk
render.py    report.json / report.md / report.html and the PNG plots
"""
