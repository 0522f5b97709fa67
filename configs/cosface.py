"""CosFace (additive cosine margin, m=0.4) with arcface_torch's WebFace recipe: iresnet50 on
WebFace4M, 20 epochs, batch 1024.

CPU demo (builds synthetic identities on first use, minutes on 2 cores):
    python -m magjax.main --config configs/cosface.py:demo --workdir runs/cosface_demo

Paper recipe on a prepared dataset (python -m magjax.data prepare --format rec ...):
    python -m magjax.main --config configs/cosface.py --workdir gs://bucket/cosface_r50 \
        --config.data.dir=/data/faces_emore_tfds

Variants after the colon, comma-separated (magjax/recipes.py): r18 r34 r50 r100 r200 mbf tiny,
ms1mv2 ms1mv3 glint360k webface4m webface12m webface42m, pfc0.1 (Partial FC), demo; e.g.
    --config configs/cosface.py:r100,webface42m,pfc0.2
Any field can be overridden, e.g. --config.optim.lr=0.2 --config.loss.s=32; a misspelt field
is an error naming it.
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("cosface", arg)
