"""AdaFace with the official recipe: IR-50 on MS1MV2, batch 512, 26 epochs, lr 0.1 x0.1 at epochs
12/20/24, m 0.4, h 0.333, EMA t_alpha 0.01, AdaFace augmentation.

CPU demo:
    python -m magjax.main --config configs/adaface.py:demo --workdir runs/adaface_demo

Paper recipe on a prepared dataset:
    python -m magjax.main --config configs/adaface.py --workdir gs://bucket/adaface_r50 \
        --config.data.dir=/data/faces_emore_tfds

Variants, overrides and data preparation: magjax/recipes.py's docstring; the settings: its
RECIPES["adaface"].
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("adaface", arg)
