"""MagFace with the official recipe: MagFace iresnet50 on MS1MV2, batch 512, 25 epochs, lr 0.1 x0.1
at epochs 10/18/22, lambda_g 35, margins 0.45..0.8 over magnitudes 10..110.

CPU demo:
    python -m magjax.main --config configs/magface.py:demo --workdir runs/demo

Paper recipe on a prepared dataset:
    python -m magjax.main --config configs/magface.py --workdir gs://bucket/magface_r50 \
        --config.data.dir=/data/faces_emore_tfds

Variants, overrides and data preparation: magjax/recipes.py's docstring; the settings: its
RECIPES["magface"].
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("magface", arg)
