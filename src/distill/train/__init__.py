"""The training stage (`distill train`): build models -> build data -> loop -> save.

loop.py        the run: set-up, the optimizer-step loop, evaluation, checkpoints, the saved student, the report
parallel.py    the student's loss as one module (`StudentLoss`), DDP / FSDP2 around it, whole state dicts
checkpoint.py  resumable state: weights, AdamW moments, RNG states and counters, written atomically
onpolicy.py    GKD: the student's own completions replace a share of the steps' data
"""
