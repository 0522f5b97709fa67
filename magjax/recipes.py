"""The official training recipes as ml_collections configs (shared by ``configs/*.py``).

Each ``configs/<loss>.py`` calls :func:`get_config` with its loss name and the argument after
the colon of ``--config configs/<loss>.py:ARG``. ``ARG`` is a comma-separated list of variants:

* backbone: ``r18`` ``r34`` ``r50`` ``r100`` ``r200`` (the loss's official family: arcface_torch
  iresnet, MagFace iresnet or AdaFace IR), ``mbf``, ``tiny``; ``vit_t`` ``vit_s`` ``vit_b``
  ``vit_l`` ``vit_h`` (arcface_torch losses only: its five ViT configs, on WebFace42M unless a
  dataset is named);
* dataset: ``ms1mv2`` ``ms1mv3`` ``glint360k`` ``webface4m`` ``webface12m`` ``webface42m``
  (sets the class and image counts, which training checks against the data; the prepared data
  still comes from ``--config.data.dir``). Without one, both counts are read off the data;
* ``pfcR``: Partial FC with sample rate R, e.g. ``pfc0.1``;
* ``demo``: a small backbone on synthetic identities on CPU, building them on first use.

A run: ``python -m magjax.main --config configs/<loss>.py[:VARIANTS] --workdir DIR`` (or
``--config magjax:<loss>[:VARIANTS]`` from any directory), with ``--config.data.dir=`` a dataset
prepared by ``python -m magjax.data prepare`` (e.g. ``--format rec`` for insightface's record
files); ``demo`` needs none. Any field can be overridden, e.g. ``--config.optim.lr=0.2
--config.loss.s=32``; a misspelt field is an error naming it. Each ``configs/<loss>.py`` says
what its recipe is and how to launch it; the settings are the loss's row of :data:`RECIPES`
(and, for arcface_torch's losses, of :data:`ARCFACE_TORCH_RECIPES`).

Sources of the defaults: docs/official-losses.md section 6 and the official config
files below. The official recipes magjax reproduces: variants after ``configs/<loss>.py:``, the
official file (arcface_torch's under ``recognition/arcface_torch/configs/``), learning rate,
weight decay, global batch (arcface_torch: 128 per GPU x 8 GPUs), epochs, warm-up epochs and
margins (arcface_torch's ``margin_list`` (m1, m2, m3); arcface_torch decays the rate linearly per
step, MagFace and AdaFace x0.1 at their milestones per epoch):

=========================  ============================  ===  =====  ====  ==  ==  ============
recipe                     official source               lr   wd     batch ep  wu  margins
=========================  ============================  ===  =====  ====  ==  ==  ============
arcface.py (ms1mv2,r50)    ms1mv2_r50.py                 0.1  5e-4   1024  20  0   (1, 0.5, 0)
arcface.py:r100            ms1mv2_r100.py                0.1  5e-4   1024  20  0   (1, 0.5, 0)
arcface.py:mbf             ms1mv2_mbf.py                 0.1  1e-4   1024  40  0   (1, 0.5, 0)
arcface.py:ms1mv3          ms1mv3_r50.py                 0.1  5e-4   1024  20  0   (1, 0.5, 0)
arcface.py:ms1mv3,mbf      ms1mv3_mbf.py                 0.1  1e-4   1024  40  0   (1, 0.5, 0)
cosface.py:glint360k       glint360k_{r50,r100,mbf}.py   0.1  1e-4   1024  20  0   (1, 0, 0.4)
cosface.py (webface4m)     wf4m_{r50,r100}.py            0.1  5e-4   1024  20  0   (1, 0, 0.4)
cosface.py:mbf             wf4m_mbf.py                   0.1  1e-4   1024  20  0   (1, 0, 0.4)
cosface.py:webface12m      wf12m_{r50,r100}.py           0.1  5e-4   1024  20  0   (1, 0, 0.4)
cosface.py:webface12m,mbf  wf12m_mbf.py                  0.1  1e-4   1024  20  0   (1, 0, 0.4)
cosface.py:webface42m,r100 wf42m_pfc02_r100.py (PFC 0.2) 0.1  5e-4   1024  20  0   (1, 0, 0.4)
magface.py (r50; :r100)    MagFace run/run.sh            0.1  5e-4   512   25  0   MagFace
adaface.py (ir_50; :r100)  AdaFace run_ir{50,101}_*.sh   0.1  5e-4*  512   26  0   m 0.4 h 0.333
curricularface.py (r100)   CurricularFace config.py      0.1  5e-4*  512   24  0   m 0.5 s 64
=========================  ============================  ===  =====  ====  ==  ==  ============

(* AdaFace, CurricularFace: not on BatchNorm parameters.)

The ViT recipes (arcface_torch's WebFace42M configs; all AdamW, lr 1e-3, weight decay 0.1,
``margin_list`` (1, 0, 0.4); batch: images per GPU x GPUs, accumulated micro-batches per
update; Partial FC sample rate):

================  ==================================  ========  ===  ==  ==  ===
recipe            official source                     batch     acc  ep  wu  PFC
================  ==================================  ========  ===  ==  ==  ===
arcface.py:vit_t  wf42m_pfc03_40epoch_8gpu_vit_t.py   512 x 8   1    40  4   0.3
arcface.py:vit_s  wf42m_pfc03_40epoch_64gpu_vit_s.py  384 x 64  1    40  4   0.3
arcface.py:vit_b  wf42m_pfc03_40epoch_8gpu_vit_b.py   256 x 8   12   40  4   0.3
arcface.py:vit_l  wf42m_pfc03_40epoch_64gpu_vit_l.py  384 x 64  1    40  4   0.3
arcface.py:vit_h  wf42m_pfc02_vit_h.py                768 x 40  1    16  2   0.5
================  ==================================  ========  ===  ==  ==  ===

The ViT recipes train with AdamW (``optim.optimizer="adamw"``, weight decay on every parameter
as ``train_v2.py`` passes them) and CosFace whichever arcface_torch file names them (the recipe
rows' ``loss``); vit_h's 40 GPUs are the 5 nodes x 8 of the ``dist.sh`` committed with its
config; vit_b accumulates 12 micro-batches of 2048 (``optim.accumulate_steps``: 24576 images
per update, warm-up and decay counted in micro-batches as ``train_v2.py``); bfloat16 where the
files say fp16, and vit_h's DALI augmentation (``dali_aug``) is not reproduced (flips only).

Every arcface_torch recipe clips the backbone gradient norm at 5 (PyTorch's formula) and uses
``PolynomialLRWarmup``'s first value (``optim.warmup_style="arcface_torch"``); the ResNet
recipes train the loss of their ``configs/<loss>.py`` file:
the official glint360k and WebFace configs are CosFace, so ``arcface.py:glint360k`` takes
their lr, weight decay and epochs with ArcFace's margin (no official config trains that). A
(dataset, backbone) pair without an official config keeps arcface_torch's ``base.py`` values
(lr 0.1, wd 5e-4, 20 epochs). BatchNorm statistics: every official trainer runs plain
BatchNorm per GPU (arcface_torch and AdaFace under DDP, MagFace under ``nn.DataParallel``), so
every recipe uses ``model.batchnorm_stats="per_device"`` (running statistics of device 0, as
the official checkpoints); the CPU demo uses ``"global"``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from types import MappingProxyType

import ml_collections

from magjax import losses
from magjax.errors import UserError

DATASETS = {  # name: (identities, images)
    "ms1mv2": (85_742, 5_822_653),
    "ms1mv3": (93_431, 5_179_510),
    "glint360k": (360_232, 17_091_657),
    "webface4m": (205_990, 4_235_242),
    "webface12m": (617_970, 12_720_066),
    "webface42m": (2_059_906, 42_474_557),
}
DEPTHS = ("18", "34", "50", "100", "200")


def _backbones(
    resnet: str, tiny: str = "tiny", depth_names: Mapping[str, str] | None = None
) -> Mapping[str, str]:
    """The backbone variants of one loss's official family -> magjax archs: ``rN`` the ResNet
    ``resnet.format(N)`` (``depth_names`` renames a depth: AdaFace's r100 is ``ir_101``),
    ``mbf``, and ``tiny`` (the demo's backbone; MagFace's keeps the trainable final BatchNorm
    scale of its family, magjax/models)."""
    names = depth_names or {}
    return MappingProxyType(
        {
            **{f"r{depth}": resnet.format(names.get(depth, depth)) for depth in DEPTHS},
            "mbf": "mbf",
            "tiny": tiny,
        }
    )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The official recipe of one ``configs/<loss>.py``: what :func:`get_config` sets over
    :func:`base_config` before the variants. ``backbone`` is the variant (a key of
    ``backbones``) trained when none is named; ``optim`` the optimizer fields it sets; ``gpus``
    those of the official run, whose global batch the recipe keeps (``global_batch`` / ``gpus``
    images per GPU). ``arcface_torch``: the (dataset, backbone) configs of
    :data:`ARCFACE_TORCH_RECIPES` apply on top (their lr, weight decay, epochs, batch)."""

    source: str
    dataset: str
    backbone: str
    backbones: Mapping[str, str]
    global_batch: int
    gpus: int
    epochs: float
    optim: Mapping[str, object]
    head_weight_init: str = "normal"
    augment: str = "flip"
    arcface_torch: bool = False


# What every arcface_torch recipe shares: clipping the backbone gradient norm at 5, and
# PolynomialLRWarmup's first value (module docstring).
_ARCFACE_TORCH = dict(
    backbone="r50",
    backbones=_backbones("iresnet{}"),
    global_batch=1024,
    gpus=8,
    epochs=20.0,
    arcface_torch=True,
    optim=MappingProxyType(dict(grad_clip_norm=5.0, warmup_style="arcface_torch")),
)
# loss -> its official recipe; official-losses.md section 6. Global batches: arcface_torch
# 8 x 128, MagFace 8 x 64 (DataParallel), AdaFace 2 x 256, CurricularFace 8 x 64.
RECIPES = {
    # insightface arcface_torch (recognition/arcface_torch/configs/): 20 epochs, poly decay.
    "arcface": Recipe("arcface_torch configs/ms1mv2_r50.py", "ms1mv2", **_ARCFACE_TORCH),
    "cosface": Recipe("arcface_torch configs/wf4m_r50.py", "webface4m", **_ARCFACE_TORCH),
    "combined": Recipe("arcface_torch configs/ms1mv2_r50.py", "ms1mv2", **_ARCFACE_TORCH),
    # MagFace run/run.sh: iresnet50, 25 epochs, x0.1 at 10/18/22.
    "magface": Recipe(
        "MagFace run/run.sh",
        "ms1mv2",
        "r50",
        _backbones("magface_iresnet{}", tiny="magface_tiny"),
        global_batch=512,
        gpus=8,
        epochs=25.0,
        optim=MappingProxyType(dict(schedule="step", milestones=(10, 18, 22))),
        head_weight_init="unit",
    ),
    # AdaFace scripts/run_ir50_ms1mv2.sh: ir_50, 26 epochs, x0.1 at 12/20/24, no weight decay
    # on BatchNorm parameters, its own augmentation.
    "adaface": Recipe(
        "AdaFace scripts/run_ir50_ms1mv2.sh",
        "ms1mv2",
        "r50",
        _backbones("ir_{}", depth_names={"100": "101"}),
        global_batch=512,
        gpus=2,
        epochs=26.0,
        optim=MappingProxyType(
            dict(schedule="step", milestones=(12, 20, 24), decay_batchnorm=False)
        ),
        head_weight_init="unit",
        augment="adaface",
    ),
    # CurricularFace config.py and train.py: IR_101 on (refined) MS1MV2, 24 epochs, lr 0.1
    # x0.1 at epochs 10/18/22, no weight decay on BatchNorm parameters, centres N(0, 0.01²),
    # flip augmentation, RGB in [-1, 1]. The backbone is arcface_torch's iresnet (same input
    # convention), not the authors' IR_101 layout.
    "curricularface": Recipe(
        "CurricularFace config.py",
        "ms1mv2",
        "r100",
        _backbones("iresnet{}"),
        global_batch=512,
        gpus=8,
        epochs=24.0,
        optim=MappingProxyType(
            dict(schedule="step", milestones=(10, 18, 22), decay_batchnorm=False)
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class ArcfaceTorchRecipe:
    """The hyper-parameters of one arcface_torch config file: ``batch_per_gpu`` x ``gpus``
    images per micro-batch (``global_batch``), ``gradient_acc`` micro-batches per update.

    ``network``: the magjax arch of the file's ``config.network`` where the variant naming the
    backbone is not the ResNet rule's (``vit_t`` trains ``vit_t_dp005_mask0``). ``loss``: the loss
    of the file's ``margin_list`` when it replaces the ``configs/<loss>.py`` file's own (the ViT
    recipes are CosFace whichever arcface_torch file names them); None keeps the file's loss.
    """

    source: str
    lr: float
    weight_decay: float
    epochs: float
    warmup_epochs: float = 0.0
    sample_rate: float = 1.0
    network: str | None = None
    loss: str | None = None
    optimizer: str = "sgd"
    batch_per_gpu: int = 128
    gpus: int = 8
    gradient_acc: int = 1


# (dataset, backbone) -> official config; the table in the module docstring lists them.
ARCFACE_TORCH_RECIPES = {
    ("ms1mv2", "r50"): ArcfaceTorchRecipe("configs/ms1mv2_r50.py", 0.1, 5e-4, 20),
    ("ms1mv2", "r100"): ArcfaceTorchRecipe("configs/ms1mv2_r100.py", 0.1, 5e-4, 20),
    ("ms1mv2", "mbf"): ArcfaceTorchRecipe("configs/ms1mv2_mbf.py", 0.1, 1e-4, 40),
    ("ms1mv3", "r50"): ArcfaceTorchRecipe("configs/ms1mv3_r50.py", 0.1, 5e-4, 20),
    ("ms1mv3", "mbf"): ArcfaceTorchRecipe("configs/ms1mv3_mbf.py", 0.1, 1e-4, 40),
    ("glint360k", "r50"): ArcfaceTorchRecipe("configs/glint360k_r50.py", 0.1, 1e-4, 20),
    ("glint360k", "r100"): ArcfaceTorchRecipe("configs/glint360k_r100.py", 0.1, 1e-4, 20),
    ("glint360k", "mbf"): ArcfaceTorchRecipe("configs/glint360k_mbf.py", 0.1, 1e-4, 20),
    ("webface4m", "r50"): ArcfaceTorchRecipe("configs/wf4m_r50.py", 0.1, 5e-4, 20),
    ("webface4m", "r100"): ArcfaceTorchRecipe("configs/wf4m_r100.py", 0.1, 5e-4, 20),
    ("webface4m", "mbf"): ArcfaceTorchRecipe("configs/wf4m_mbf.py", 0.1, 1e-4, 20),
    ("webface12m", "r50"): ArcfaceTorchRecipe("configs/wf12m_r50.py", 0.1, 5e-4, 20),
    ("webface12m", "r100"): ArcfaceTorchRecipe("configs/wf12m_r100.py", 0.1, 5e-4, 20),
    ("webface12m", "mbf"): ArcfaceTorchRecipe("configs/wf12m_mbf.py", 0.1, 1e-4, 20),
    ("webface42m", "r100"): ArcfaceTorchRecipe(
        "configs/wf42m_pfc02_r100.py", 0.1, 5e-4, 20, sample_rate=0.2
    ),
    # The Vision Transformers: margin_list (1.0, 0.0, 0.4), AdamW, warm-up num_epoch // 10
    # (vit_h: // 8), Partial FC 0.3 (vit_h: 0.5). vit_h's GPUs: dist.sh of the commit that added
    # its config launches it on 5 nodes x 8 GPUs.
    ("webface42m", "vit_t"): ArcfaceTorchRecipe(
        "configs/wf42m_pfc03_40epoch_8gpu_vit_t.py",
        lr=1e-3,
        weight_decay=0.1,
        epochs=40,
        warmup_epochs=4,
        sample_rate=0.3,
        network="vit_t_dp005_mask0",
        loss="cosface",
        optimizer="adamw",
        batch_per_gpu=512,
    ),
    ("webface42m", "vit_s"): ArcfaceTorchRecipe(
        "configs/wf42m_pfc03_40epoch_64gpu_vit_s.py",
        lr=1e-3,
        weight_decay=0.1,
        epochs=40,
        warmup_epochs=4,
        sample_rate=0.3,
        network="vit_s_dp005_mask_0",
        loss="cosface",
        optimizer="adamw",
        batch_per_gpu=384,
        gpus=64,
    ),
    ("webface42m", "vit_b"): ArcfaceTorchRecipe(
        "configs/wf42m_pfc03_40epoch_8gpu_vit_b.py",
        lr=1e-3,
        weight_decay=0.1,
        epochs=40,
        warmup_epochs=4,
        sample_rate=0.3,
        network="vit_b_dp005_mask_005",
        loss="cosface",
        optimizer="adamw",
        batch_per_gpu=256,
        gradient_acc=12,
    ),
    ("webface42m", "vit_l"): ArcfaceTorchRecipe(
        "configs/wf42m_pfc03_40epoch_64gpu_vit_l.py",
        lr=1e-3,
        weight_decay=0.1,
        epochs=40,
        warmup_epochs=4,
        sample_rate=0.3,
        network="vit_l_dp005_mask_005",
        loss="cosface",
        optimizer="adamw",
        batch_per_gpu=384,
        gpus=64,
    ),
    ("webface42m", "vit_h"): ArcfaceTorchRecipe(
        "configs/wf42m_pfc02_vit_h.py",
        lr=1e-3,
        weight_decay=0.1,
        epochs=16,
        warmup_epochs=2,
        sample_rate=0.5,
        network="vit_h",
        loss="cosface",
        optimizer="adamw",
        batch_per_gpu=768,
        gpus=40,
    ),
}
# Backbone variants that name an official config's network (the ViTs): variant -> (dataset,
# arch). Without a dataset variant they train on their recipe's dataset.
ARCFACE_TORCH_NETWORKS = {
    backbone: (dataset, recipe.network)
    for (dataset, backbone), recipe in ARCFACE_TORCH_RECIPES.items()
    if recipe.network
}


def _backbone_variant(recipe: Recipe, arch: str) -> str | None:
    """The backbone variant of ``recipe`` (or ViT variant) that trains ``arch``."""
    archs = {
        **recipe.backbones,
        **{variant: network for variant, (_, network) in ARCFACE_TORCH_NETWORKS.items()},
    }
    return next((variant for variant, name in archs.items() if name == arch), None)


def official_recipe(config: ml_collections.ConfigDict) -> ArcfaceTorchRecipe | None:
    """The arcface_torch config file that ``config``'s loss, dataset and backbone follow. A ViT
    on another published dataset keeps its own recipe (arcface_torch has no other for it; base.py's
    SGD at lr 0.1 is a ResNet setting)."""
    loss_recipe = RECIPES.get(config.loss.name)
    if loss_recipe is None or not loss_recipe.arcface_torch:
        return None
    backbone = _backbone_variant(loss_recipe, config.model.arch)
    recipe = ARCFACE_TORCH_RECIPES.get((config.data.dataset, backbone))
    if recipe is None and backbone in ARCFACE_TORCH_NETWORKS and config.data.dataset in DATASETS:
        recipe = ARCFACE_TORCH_RECIPES[ARCFACE_TORCH_NETWORKS[backbone][0], backbone]
    return recipe


def _apply_arcface_torch_recipe(c: ml_collections.ConfigDict, sample_rate_given: bool) -> None:
    recipe = official_recipe(c)
    if recipe is None:
        return
    c.optim.update(
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        warmup_epochs=recipe.warmup_epochs,
        accumulate_steps=recipe.gradient_acc,
    )
    c.epochs = float(recipe.epochs)
    c.global_batch = recipe.batch_per_gpu * recipe.gpus
    if recipe.loss is not None and recipe.loss != c.loss.name:
        c.loss = _loss_fields(recipe.loss)
    if not sample_rate_given:
        c.head.sample_rate = recipe.sample_rate


def default_cache_dir() -> str:
    """Where the demo's synthetic dataset is built once and reused."""
    root = os.environ.get("MAGJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "magjax")


def synthetic_data_dir(options: dict) -> str:
    """Where the synthetic identities of ``options`` (``data.synthetic_options``) are built once
    and reused: a folder of the cache directory named after the options."""
    rest = dict(options)
    name = (
        f"synthetic_{rest.pop('num_identities', 'default')}x"
        f"{rest.pop('images_per_identity', 'default')}"
        + "".join(f"_{key}{value}" for key, value in sorted(rest.items()))
    )
    return os.path.join(default_cache_dir(), name)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_devices = ml_collections.config_dict.placeholder(int)  # None: every device
    # On a CPU host, the number of XLA devices to split it into (set by magjax.main before JAX
    # starts, unless XLA_FLAGS forces a device count). The demo trains data-parallel over 2 CPU
    # devices, measured fastest on 2 cores (BENCHMARKS.md).
    c.cpu_devices = ml_collections.config_dict.placeholder(int)
    c.data = dict(
        dir=ml_collections.config_dict.placeholder(str),  # a prepared dataset directory
        dataset="ms1mv2",
        num_classes=ml_collections.config_dict.placeholder(int),  # checked against the data
        num_examples=ml_collections.config_dict.placeholder(int),
        augment="flip",
        num_workers=0,
        # Without a data.dir: build synthetic identities once under the cache directory and
        # train on them (the demo); keys are magjax.data prepare options. A data.dir given is
        # always the user's prepared data, never built into.
        synthetic=False,
        synthetic_options=ml_collections.ConfigDict(),
    )
    c.model = dict(
        arch="iresnet50",
        dtype="bfloat16",
        dropout=ml_collections.config_dict.placeholder(float),
        embedding_dim=512,
        # BatchNorm statistics in training: "per_device" (each device's shard of the
        # batch on its own, the official trainers' plain BatchNorm under DDP) or
        # "global" (the whole batch, as SyncBatchNorm).
        batchnorm_stats="per_device",
    )
    c.loss = _loss_fields("arcface")  # the fields of the chosen loss (get_config)
    c.head = dict(
        sample_rate=1.0,
        weight_init="normal",
        # Partial FC: True keeps momentum and weight decay off unsampled centres
        # (and differentiates the sampled rows alone: no dense [C, d] gradient);
        # False (arcface_torch) lets one SGD move every centre each step.
        freeze_unsampled=False,
        # 0: each shard's [C_local, B] cosines at once. n >= 1: the head visits each
        # shard's classes n at a time and recomputes them in the backward pass (one
        # matrix product more), so that no [C_local, B] array exists: the same loss
        # and gradients, memory no longer growing with batch x classes
        # (magjax.losses.blocked; BENCHMARKS.md "The head class block by block").
        # Unset: the dense head while its two [C_local, B] float32 arrays take at
        # most half a device's memory, else blocks sized from it (head.class_block_size;
        # the training log says when it blocks).
        block_size=ml_collections.config_dict.placeholder(int),
    )
    c.optim = dict(
        # "sgd" (torch.optim.SGD with momentum) or "adamw" (torch.optim.AdamW: decoupled
        # decay lr·wd, betas and eps below, arcface_torch's ViT recipes).
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        adam_betas=(0.9, 0.999),
        adam_eps=1e-8,  # "adamw" only; torch.optim.AdamW's defaults
        decay_batchnorm=True,  # AdaFace: False (no weight decay on BatchNorm parameters)
        schedule="poly",  # "poly": linear warm-up then linear decay to 0 per step; "step"
        warmup_epochs=0.0,
        warmup_style="plain",  # "arcface_torch": the first update at the full lr (optim.py)
        milestones=(),  # "step": x0.1 at these epochs
        grad_clip_norm=ml_collections.config_dict.placeholder(float),  # on the backbone only
        grad_clip_eps=1e-6,  # torch clip_grad_norm_: x max_norm / (norm + eps); 0: optax's
        # Backbone gradients rounded to and all-reduced in this dtype before clipping;
        # "float16" is arcface_torch's fp16_compress_hook (models.per_device_forward).
        grad_allreduce_dtype="float32",
        # arcface_torch's gradient_acc: micro-batches (of global_batch each) per update, their
        # gradients averaged; the schedule still steps every micro-batch (optim.py).
        accumulate_steps=1,
    )
    c.global_batch = 1024
    c.epochs = 20.0
    c.total_steps = ml_collections.config_dict.placeholder(int)  # overrides epochs when set
    c.nan_policy = "stop"  # "stop": fail naming the step range; "skip": drop that update
    c.log_every_steps = 50
    c.eval = dict(
        every_steps=2000,
        # The held-out sets the prepared data holds (its manifest names them): the synthetic
        # data's verification.bin and quality.npz, or the verification.bin of
        # `magjax.data prepare --holdout N`. Evaluated besides the sets named below.
        heldout_sets=True,
        # Verification .bin files and a quality set (.npz with images, quality levels and
        # identity labels, from synthetic data); relative paths are resolved against data.dir.
        # "" / "none" / () switch them off.
        bins=(),
        quality_set="",
        # More evaluation sets, of any kind of magjax.evaluators.KINDS, by name: e.g.
        # {"cfp_fp": {"kind": "verification", "paths": "cfp_fp.bin"},
        #  "ijbc": {"kind": "ijb", "root": "/data/IJB_release", "target": "IJBC"}}.
        sets={},
        # The result whose highest value picks model_best: a metric's name as logged
        # ("verification/lfw/accuracy", "quality/spearman_norm_vs_quality"), "*" matching any
        # part; the first metric that matches counts.
        best_metric="verification/*/accuracy",
        batch_size=256,
    )
    c.checkpoint = dict(every_steps=2000, keep=3)
    return c


def _loss_fields(name: str) -> ml_collections.ConfigDict:
    """The loss ``name`` and its hyper-parameters (the fields of its
    :class:`magjax.losses.MarginLoss`) with their official defaults, so that any of them, and
    only these, can be overridden from the command line."""
    fields = {"name": name, **dataclasses.asdict(losses.MarginLoss.create(name))}
    fields["probability_floor"] = ml_collections.FieldReference(
        fields["probability_floor"], field_type=float
    )
    return ml_collections.ConfigDict(fields)


def get_config(loss: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The official recipe of ``loss`` with the variants named in ``arg``."""
    c = base_config()
    c.loss = _loss_fields(loss)  # an unknown loss: an error listing the registered ones
    recipe = RECIPES.get(loss)
    if recipe is None:
        raise ValueError(f"no recipe for loss {loss!r}")
    c.data.dataset = recipe.dataset
    c.data.augment = recipe.augment
    c.model.arch = recipe.backbones[recipe.backbone]
    c.head.weight_init = recipe.head_weight_init
    c.optim.update(**recipe.optim)
    c.global_batch = recipe.global_batch
    c.epochs = float(recipe.epochs)

    named_dataset = sample_rate_given = False
    network_dataset = None
    for variant in filter(None, (arg or "").replace(":", ",").split(",")):
        if variant in DATASETS:
            c.data.dataset = variant
            named_dataset = True
        elif variant in recipe.backbones:
            c.model.arch = recipe.backbones[variant]
        elif variant in ARCFACE_TORCH_NETWORKS:
            if not recipe.arcface_torch:
                raise ValueError(
                    f"variant {variant!r} is an arcface_torch recipe; use "
                    f"configs/arcface.py:{variant}"
                )
            network_dataset, c.model.arch = ARCFACE_TORCH_NETWORKS[variant]
        elif variant.startswith("pfc"):
            c.head.sample_rate = float(variant[3:])
            sample_rate_given = True
        elif variant == "demo":
            _demo(c, recipe)
        else:
            raise ValueError(
                f"unknown config variant {variant!r} in {arg!r}; see magjax/recipes.py for the list"
            )
    if network_dataset is not None and not named_dataset and not c.data.synthetic:
        c.data.dataset = network_dataset
        named_dataset = True
    if recipe.arcface_torch:
        _apply_arcface_torch_recipe(c, sample_rate_given)
    if named_dataset and not c.data.synthetic:
        c.data.num_classes, c.data.num_examples = DATASETS[c.data.dataset]
    return c


def _demo(c: ml_collections.ConfigDict, recipe: Recipe) -> None:
    """CPU demo: the tiny backbone on synthetic identities, minutes on 2 cores."""
    c.data.dataset = "synthetic"
    c.data.synthetic = True
    # 300 identities x 50 images: with more images per identity than the 1000 x 20 default,
    # the net fits its training identities within the few epochs a CPU allows. Nuisance (pose,
    # illumination, expression) at a quarter of the generator's default spread, so that an
    # image's quality level, not its pose, decides how recognisable it is: at full spread the
    # level explains little of it (Spearman of recognisability and level 0.30, of the MagFace
    # magnitude and level 0.18); at a quarter 0.56 and 0.55 (BENCHMARKS.md).
    options = dict(num_identities=300, images_per_identity=50, nuisance=0.25)
    c.data.synthetic_options = ml_collections.ConfigDict(options)
    c.data.dir = None  # synthetic_data_dir(options) unless the user names their own data
    c.data.num_classes = None
    c.data.num_examples = None
    c.data.augment = "flip"
    c.model.arch = recipe.backbones["tiny"]
    c.model.dtype = "float32"  # bf16 is emulated (slow) on most CPUs
    # The demo's CPU devices are a speed setting, not the GPUs of an official run: global
    # statistics keep its results independent of how the CPU is split.
    c.model.batchnorm_stats = "global"
    c.model.dropout = 0.0
    c.cpu_devices = 2
    c.global_batch = 128
    # The bars (held-out accuracy >= 0.90, Spearman(norm, quality) >= 0.5) hold from ~1 epoch
    # on (MagFace: 0.996 and 0.554 at 100 steps); 1.2 epochs keep the demo within 2 minutes on
    # 2 cores.
    c.epochs = 1.2
    c.optim.update(lr=0.1, schedule="poly", warmup_epochs=0.5, warmup_style="plain", milestones=())
    c.log_every_steps = 20
    # Evaluated on the synthetic data's held-out identities (eval.heldout_sets).
    c.eval.update(every_steps=70, batch_size=256)
    c.checkpoint.update(every_steps=70, keep=2)


def official_per_device_batch(config: ml_collections.ConfigDict) -> int:
    """Images per GPU in the official run that ``config``'s recipe follows (its config file's
    GPUs, else the loss's, :data:`RECIPES`)."""
    recipe = official_recipe(config)
    return config.global_batch // (recipe.gpus if recipe else RECIPES[config.loss.name].gpus)


def with_dataset_counts(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose unset class and image counts are its dataset's published ones
    (training reads them from the data; the ahead-of-time benchmarks have none)."""
    config = config.copy_and_resolve_references()
    if config.data.num_classes is None or config.data.num_examples is None:
        if config.data.dataset not in DATASETS:
            raise ValueError(
                f"data.dataset {config.data.dataset!r} has no published counts; "
                "set data.num_classes and data.num_examples"
            )
        classes, examples = DATASETS[config.data.dataset]
        config.data.num_classes = config.data.num_classes or classes
        config.data.num_examples = config.data.num_examples or examples
    return config


def config_from_file(spec: str) -> ml_collections.ConfigDict:
    """The config of ``--config``-style ``spec``: ``configs/arcface.py:r100,pfc0.2`` calls that
    file's ``get_config("r100,pfc0.2")`` (what ml_collections' config flag does for
    ``magjax.main``, for entry points that take argparse options)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found (from {spec!r})")
    module_spec = importlib.util.spec_from_file_location("magjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg or None)
    except ValueError as error:  # an unknown variant: the user's --config, as magjax.main says
        raise UserError(f"--config {spec}: {error}") from error
