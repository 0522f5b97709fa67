"""CurricularFace (adaptive curriculum on hard non-targets) with the authors' recipe: IR-101 class
backbone (magjax: iresnet100) on MS1MV2, batch 512, 24 epochs, lr 0.1 x0.1 at epochs 10/18/22,
s 64, m 0.5, t's momentum 0.01.

CPU demo (builds synthetic identities on first use, minutes on 2 cores):
    python -m magjax.main --config configs/curricularface.py:demo --workdir runs/curricular_demo

Paper recipe on a prepared dataset (python -m magjax.data prepare --format rec ...):
    python -m magjax.main --config configs/curricularface.py --workdir gs://bucket/curr_r100 \
        --config.data.dir=/data/faces_emore_tfds

Variants after the colon, comma-separated (magjax/recipes.py): r18 r34 r50 r100 r200 mbf tiny,
ms1mv2 ms1mv3 glint360k webface4m webface12m webface42m, pfc0.1 (Partial FC), demo; e.g.
    --config configs/curricularface.py:r50,webface4m
Any field can be overridden, e.g. --config.optim.lr=0.2 --config.loss.m=0.4; a misspelt field
is an error naming it.
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("curricularface", arg)
