"""The module types saved models hold (each a compressed linear layer with a reference
dequantised weight, its format description, a shard rule and ``config``/``from_config``),
their registry, and module surgery helpers."""
