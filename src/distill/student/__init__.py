"""Build a student by pruning the teacher, ready for distillation (`distill student`, `student.from_teacher`).

build.py         reads top to bottom: plan -> load -> score -> cut -> save (`build_student`)
architecture.py  which parameter holds which axis (hidden, MLP neurons, query heads, KV heads)
target.py        the student's sizes: explicit ones, or solved from a parameter budget
importance.py    what to keep: block influence (depth) and activation or weight magnitudes (width)
depth.py         which layers to keep by the KL to the teacher on calibration data (exhaustive or greedy search)
slicing.py       which indices to keep, and the teacher's tensors cut down to them
"""
