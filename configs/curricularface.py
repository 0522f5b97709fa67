"""CurricularFace (adaptive curriculum on hard non-targets) with the authors' recipe: IR-101 class
backbone (magjax: iresnet100) on MS1MV2, batch 512, 24 epochs, lr 0.1 x0.1 at epochs 10/18/22,
s 64, m 0.5, t's momentum 0.01.

CPU demo:
    python -m magjax.main --config configs/curricularface.py:demo --workdir runs/curricular_demo

Paper recipe on a prepared dataset:
    python -m magjax.main --config configs/curricularface.py --workdir gs://bucket/curr_r100 \
        --config.data.dir=/data/faces_emore_tfds

Variants, overrides and data preparation: magjax/recipes.py's docstring; the settings: its
RECIPES["curricularface"].
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("curricularface", arg)
