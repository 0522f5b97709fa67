"""MagFace with the official recipe: MagFace iresnet50 on MS1MV2, batch 512, 25 epochs, lr 0.1 x0.1
at epochs 10/18/22, lambda_g 35, margins 0.45..0.8 over magnitudes 10..110.

CPU demo (builds synthetic identities on first use, minutes on 2 cores):
    python -m magjax.main --config configs/magface.py:demo --workdir runs/demo

Paper recipe on a prepared dataset (python -m magjax.data prepare --format rec ...):
    python -m magjax.main --config configs/magface.py --workdir gs://bucket/magface_r50 \
        --config.data.dir=/data/faces_emore_tfds

Variants after the colon, comma-separated (magjax/recipes.py): r18 r34 r50 r100 r200 mbf tiny,
ms1mv2 ms1mv3 glint360k webface4m webface12m webface42m, pfc0.1 (Partial FC), demo; e.g.
    --config configs/magface.py:r100,webface42m,pfc0.2
Any field can be overridden, e.g. --config.optim.lr=0.2 --config.loss.s=32; a misspelt field
is an error naming it.
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("magface", arg)
