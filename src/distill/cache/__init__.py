"""Offline teacher signals: run the teacher once, train many times (`distill cache`, `teacher.cache`).

build.py      reads top to bottom: plan -> shards from the teacher -> manifest (`build_cache`), dealt over ranks
format.py     the folder's files: shard names, safetensors layout, atomic writes, bit packing, quantization
identity.py   who built it: tokenizer and teacher hashes, the teacher's file records
generated.py  building from a `distill generate` file's stored top-k log-probs instead of running the teacher
served.py     a teacher at teacher.endpoint: its prompt log-probs (vLLM's prompt_logprobs or echo), checked limits
reader.py     reading it back: manifest, verification, sampled targets, `CacheReader` for training
cross.py      across tokenizers: the teacher's own ids of each text and its top-k at every position; read at the
              anchors of any student tokenizer that reads the same text (`CrossCacheReader`)
"""
