"""The training stage (`distill train`): build models -> build data -> loop -> save.

loop.py        the run, top to bottom: set up -> optimizer steps (logging window, evaluation, checkpoints) -> save
setup.py       everything before the first step: accelerator, run folder (resume checks), models, the teacher's
               signal, the loss module under DDP / FSDP2, AdamW, the resumed state (`set_up` -> `Run`)
step.py        one optimizer step: the student's loss as one module (`StudentLoss`), the teacher's signal of a
               micro-batch (`step_loss`), the step's micro-batches, accumulate -> clip -> update
output.py      what a run leaves: the saved student (`save_student`, `saved_dtype`) and the run's report
parallel.py    DDP / FSDP2 strategies, sharding, no-sync, gradient clipping, whole state dicts
checkpoint.py  resumable state: weights, AdamW moments, RNG states and counters, written atomically
cross.py       across tokenizers: the teacher's own tokenization of each micro-batch, its rows at the anchors
onpolicy.py    GKD: the student's own completions replace a share of the steps' data
served.py      a teacher at teacher.endpoint: each micro-batch's sparse targets from its server, asked a step ahead
teachers.py    several teachers (recipe key teachers): each row's targets from its own teacher, per-teacher report
lora.py        LoRA students (extra [peft]): the adapter, the student's own base as teacher, merged + adapter saves
recompute.py   training.gradient_checkpointing: selective: keep products, recompute the elementwise ops
trackers.py    training.report_to: TensorBoard / W&B / MLflow / Trackio fed the metrics.jsonl events (resumable)
"""
