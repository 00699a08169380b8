"""Teacher completions for prompts (`distill generate`) and the OpenAI-compatible teacher (`distill serve`).

run.py     prompts -> completions from a local teacher or an endpoint, resumable, deduplicated, with top-k log-probs
client.py  the OpenAI-compatible HTTP client (retries, backoff, Retry-After)
server.py  the reference server `distill serve` (FastAPI), one local model behind OpenAI's request shapes
"""
