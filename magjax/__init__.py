"""magjax: margin-loss face recognition in JAX/Flax, data-parallel with a class-sharded head."""
