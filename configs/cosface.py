"""CosFace (additive cosine margin, m=0.4) with arcface_torch's WebFace recipe: iresnet50 on
WebFace4M, 20 epochs, batch 1024.

CPU demo:
    python -m magjax.main --config configs/cosface.py:demo --workdir runs/cosface_demo

Paper recipe on a prepared dataset:
    python -m magjax.main --config configs/cosface.py --workdir gs://bucket/cosface_r50 \
        --config.data.dir=/data/faces_emore_tfds

Variants, overrides and data preparation: magjax/recipes.py's docstring; the settings: its
RECIPES["cosface"].
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("cosface", arg)
