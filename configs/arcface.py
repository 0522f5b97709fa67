"""ArcFace (additive angular margin) with arcface_torch's recipe: iresnet50 on MS1MV2, 20 epochs,
batch 1024, lr 0.1 with linear decay, straight-through margin as insightface.

CPU demo:
    python -m magjax.main --config configs/arcface.py:demo --workdir runs/arcface_demo

Paper recipe on a prepared dataset:
    python -m magjax.main --config configs/arcface.py --workdir gs://bucket/arcface_r50 \
        --config.data.dir=/data/faces_emore_tfds

arcface_torch's Vision Transformer recipes on WebFace42M: vit_t vit_s vit_b vit_l vit_h are its
configs wf42m_pfc03_40epoch_8gpu_vit_t.py, _64gpu_vit_s.py, _8gpu_vit_b.py, _64gpu_vit_l.py and
wf42m_pfc02_vit_h.py: their networks (vit_t_dp005_mask0, vit_s_dp005_mask_0,
vit_b_dp005_mask_005, vit_l_dp005_mask_005, vit_h), CosFace margin_list (1, 0, 0.4) with s 64
as those files train (not ArcFace), AdamW lr 1e-3 weight decay 0.1, Partial FC 0.3 (vit_h 0.5),
40 epochs with 4 of warm-up (vit_h 16 and 2), clipping at 5, the official batch per GPU x GPUs
(vit_b with 12 accumulated micro-batches per update). They compute in bfloat16 where the official
files train fp16 (with a loss scaler); e.g.
    python -m magjax.main --config configs/arcface.py:vit_b --workdir gs://bucket/vit_b \
        --config.data.dir=/data/webface42m

Variants, overrides and data preparation: magjax/recipes.py's docstring; the settings: its
RECIPES["arcface"].
"""

from magjax import recipes


def get_config(arg=None):
    return recipes.get_config("arcface", arg)
