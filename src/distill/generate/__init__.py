"""Teacher completions for prompts (`distill generate`) and the OpenAI-compatible teacher (`distill serve`).

run.py       `distill generate`: prompts -> completions from a local teacher or an endpoint -> the output rows
prompts.py   reading the prompts (prompt or chat rows), their fingerprint, their token ids
local.py     a local teacher's completions, batched through distill.sampling.decode, with top-k log-probs
endpoint.py  an OpenAI-compatible teacher: requests from the recipe, answers -> completion fields
partial.py   the resumable hidden .partial file: finished prompts, their settings, the deduplicated output
client.py    the OpenAI-compatible HTTP client (retries, backoff, Retry-After)
server.py    the reference server `distill serve` (FastAPI), one local model behind OpenAI's request shapes
"""
