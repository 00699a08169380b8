"""Offline teacher signals: run the teacher once, train many times (`distill cache`, `teacher.cache`).

build.py  the cache: identities, shard format, quantization, building from a teacher or a generate file,
          verification and the reader that training uses
"""
