"""magjax: margin-loss face recognition in JAX/Flax, data-parallel with a class-sharded head."""


def __getattr__(name):
    # FaceEncoder is imported on first use so that `import magjax` stays light.
    if name == "FaceEncoder":
        from magjax.encoder import FaceEncoder

        return FaceEncoder
    raise AttributeError(f"module 'magjax' has no attribute {name!r}")
