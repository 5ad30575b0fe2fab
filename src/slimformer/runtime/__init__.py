"""Fast CPU inference runtime: native KV-cached decoding, generation, padding-free
batches, offloading and tensor parallelism."""

# Generation engines (kept here so the CLI can list them without importing torch).
ENGINES = ("auto", "native", "hf")
