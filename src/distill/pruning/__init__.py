"""Structured pruning of a teacher into a smaller student (the mechanics behind `distill.student`).

architecture.py  which parameter holds which axis (hidden, MLP neurons, query heads, KV heads)
target.py        the student's sizes: explicit ones, or solved from a parameter budget
importance.py    what to keep: block influence (depth) and activation or weight magnitudes (width)
depth.py         which layers to keep by the KL to the teacher on calibration data (exhaustive or greedy search)
slicing.py       which indices to keep, and the teacher's tensors cut down to them
"""
