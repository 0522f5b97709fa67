"""The recipes carry the official hyper-parameters (rows of the table in magjax/recipes.py)."""

import pytest

from magjax import recipes


@pytest.mark.parametrize(
    "loss, variants, expected",
    [
        # arcface_torch configs/ms1mv2_r50.py
        (
            "arcface",
            None,
            dict(
                arch="iresnet50",
                dataset="ms1mv2",
                lr=0.1,
                wd=5e-4,
                epochs=20,
                m=0.5,
                sample_rate=1.0,
            ),
        ),
        # configs/ms1mv2_mbf.py: weight decay 1e-4, 40 epochs
        (
            "arcface",
            "mbf",
            dict(arch="mbf", dataset="ms1mv2", lr=0.1, wd=1e-4, epochs=40, m=0.5, sample_rate=1.0),
        ),
        ("arcface", "ms1mv3,mbf", dict(arch="mbf", dataset="ms1mv3", wd=1e-4, epochs=40)),
        # configs/glint360k_r100.py: CosFace (1, 0, 0.4), weight decay 1e-4
        (
            "cosface",
            "glint360k,r100",
            dict(
                arch="iresnet100",
                dataset="glint360k",
                lr=0.1,
                wd=1e-4,
                epochs=20,
                m=0.4,
                sample_rate=1.0,
            ),
        ),
        ("cosface", "glint360k,mbf", dict(arch="mbf", wd=1e-4, epochs=20)),
        # configs/wf4m_r50.py and wf4m_mbf.py
        ("cosface", None, dict(arch="iresnet50", dataset="webface4m", wd=5e-4, epochs=20, m=0.4)),
        ("cosface", "mbf", dict(arch="mbf", dataset="webface4m", wd=1e-4, epochs=20)),
        ("cosface", "webface12m,mbf", dict(wd=1e-4, epochs=20)),
        # configs/wf42m_pfc02_r100.py: Partial FC 0.2, which an explicit pfc variant overrides
        ("cosface", "webface42m,r100", dict(wd=5e-4, sample_rate=0.2)),
        ("cosface", "r100,webface42m,pfc0.1", dict(sample_rate=0.1)),
        # MagFace run/run.sh, AdaFace scripts/run_ir101_ms1mv2.sh
        ("magface", "r100", dict(arch="magface_iresnet100", lr=0.1, wd=5e-4, epochs=25, batch=512)),
        ("adaface", "r100", dict(arch="ir_101", lr=0.1, wd=5e-4, epochs=26, batch=512, m=0.4)),
        (
            "curricularface",
            None,
            dict(arch="iresnet100", dataset="ms1mv2", lr=0.1, wd=5e-4, epochs=24, batch=512, m=0.5),
        ),
    ],
)
def test_official_hyper_parameters(loss, variants, expected):
    c = recipes.get_config(loss, variants)
    actual = dict(
        arch=c.model.arch,
        dataset=c.data.dataset,
        lr=c.optim.lr,
        wd=c.optim.weight_decay,
        epochs=c.epochs,
        m=c.loss.get("m"),
        sample_rate=c.head.sample_rate,
        batch=c.global_batch,
    )
    assert {key: actual[key] for key in expected} == expected
    assert c.model.batchnorm_stats == "per_device"  # every official trainer's BatchNorm


# arcface_torch's official configs (recognition/arcface_torch/configs/), written out here and not
# read from magjax's table: (dataset, backbone) -> (source file, lr, weight decay, global batch
# 128 x 8 GPUs, epochs, warm-up epochs, margin_list (m1, m2, m3), Partial FC sample rate). The
# glint360k and WebFace configs train CosFace (1, 0, 0.4); MS1MV2/MS1MV3 ArcFace (1, 0.5, 0).
ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.4)
OFFICIAL_ARCFACE_TORCH = {
    ("ms1mv2", "r50"): ("configs/ms1mv2_r50.py", 0.1, 5e-4, 1024, 20, 0, ARCFACE, 1.0),
    ("ms1mv2", "r100"): ("configs/ms1mv2_r100.py", 0.1, 5e-4, 1024, 20, 0, ARCFACE, 1.0),
    ("ms1mv2", "mbf"): ("configs/ms1mv2_mbf.py", 0.1, 1e-4, 1024, 40, 0, ARCFACE, 1.0),
    ("ms1mv3", "r50"): ("configs/ms1mv3_r50.py", 0.1, 5e-4, 1024, 20, 0, ARCFACE, 1.0),
    ("ms1mv3", "mbf"): ("configs/ms1mv3_mbf.py", 0.1, 1e-4, 1024, 40, 0, ARCFACE, 1.0),
    ("glint360k", "r50"): ("configs/glint360k_r50.py", 0.1, 1e-4, 1024, 20, 0, COSFACE, 1.0),
    ("glint360k", "r100"): ("configs/glint360k_r100.py", 0.1, 1e-4, 1024, 20, 0, COSFACE, 1.0),
    ("glint360k", "mbf"): ("configs/glint360k_mbf.py", 0.1, 1e-4, 1024, 20, 0, COSFACE, 1.0),
    ("webface4m", "r50"): ("configs/wf4m_r50.py", 0.1, 5e-4, 1024, 20, 0, COSFACE, 1.0),
    ("webface4m", "r100"): ("configs/wf4m_r100.py", 0.1, 5e-4, 1024, 20, 0, COSFACE, 1.0),
    ("webface4m", "mbf"): ("configs/wf4m_mbf.py", 0.1, 1e-4, 1024, 20, 0, COSFACE, 1.0),
    ("webface12m", "r50"): ("configs/wf12m_r50.py", 0.1, 5e-4, 1024, 20, 0, COSFACE, 1.0),
    ("webface12m", "r100"): ("configs/wf12m_r100.py", 0.1, 5e-4, 1024, 20, 0, COSFACE, 1.0),
    ("webface12m", "mbf"): ("configs/wf12m_mbf.py", 0.1, 1e-4, 1024, 20, 0, COSFACE, 1.0),
    ("webface42m", "r100"): ("configs/wf42m_pfc02_r100.py", 0.1, 5e-4, 1024, 20, 0, COSFACE, 0.2),
}


@pytest.mark.parametrize("dataset, backbone", list(OFFICIAL_ARCFACE_TORCH))
def test_every_arcface_torch_recipe_follows_its_official_config(dataset, backbone):
    source, lr, wd, batch, epochs, warmup, margins, sample_rate = OFFICIAL_ARCFACE_TORCH[
        (dataset, backbone)
    ]
    loss = "arcface" if margins == ARCFACE else "cosface"
    c = recipes.get_config(loss, f"{dataset},{backbone}")
    assert recipes.ARCFACE_TORCH_RECIPES[(dataset, backbone)].source == source
    assert (c.optim.lr, c.optim.weight_decay, c.global_batch, c.epochs, c.optim.warmup_epochs) == (
        lr,
        wd,
        batch,
        epochs,
        warmup,
    )
    m1, m2, m3 = margins
    assert (c.loss.name, c.loss.s, c.loss.m) == (loss, 64.0, m2 if loss == "arcface" else m3)
    assert m1 == 1.0 and c.head.sample_rate == sample_rate
    assert c.optim.grad_clip_norm == 5.0 and c.optim.grad_clip_eps == 1e-6
    assert c.optim.warmup_style == "arcface_torch"
    # every official config is in the table, and nothing else is
    assert set(recipes.ARCFACE_TORCH_RECIPES) == set(OFFICIAL_ARCFACE_TORCH) | {
        ("webface42m", variant) for variant in OFFICIAL_VIT
    }


# arcface_torch's ViT configs, written out here: variant of configs/arcface.py -> (source file,
# config.network, batch_size per GPU, GPUs, gradient_acc, num_epoch, warmup_epoch, sample_rate).
# All: WebFace42M (2,059,906 classes, 42,474,557 images), margin_list (1.0, 0.0, 0.4), AdamW,
# lr 0.001, weight_decay 0.1. vit_h's GPUs: dist.sh of the commit adding its config (5 x 8).
OFFICIAL_VIT = {
    "vit_t": (
        "configs/wf42m_pfc03_40epoch_8gpu_vit_t.py",
        "vit_t_dp005_mask0",
        512,
        8,
        1,
        40,
        4,
        0.3,
    ),
    "vit_s": (
        "configs/wf42m_pfc03_40epoch_64gpu_vit_s.py",
        "vit_s_dp005_mask_0",
        384,
        64,
        1,
        40,
        4,
        0.3,
    ),
    "vit_b": (
        "configs/wf42m_pfc03_40epoch_8gpu_vit_b.py",
        "vit_b_dp005_mask_005",
        256,
        8,
        12,
        40,
        4,
        0.3,
    ),
    "vit_l": (
        "configs/wf42m_pfc03_40epoch_64gpu_vit_l.py",
        "vit_l_dp005_mask_005",
        384,
        64,
        1,
        40,
        4,
        0.3,
    ),
    "vit_h": ("configs/wf42m_pfc02_vit_h.py", "vit_h", 768, 40, 1, 16, 2, 0.5),
}


@pytest.mark.parametrize("variant", list(OFFICIAL_VIT))
def test_every_vit_recipe_follows_its_official_config(variant):
    from magjax import config_check

    source, network, per_gpu, gpus, acc, epochs, warmup, sample_rate = OFFICIAL_VIT[variant]
    c = recipes.config_from_file(f"configs/arcface.py:{variant}")
    assert recipes.ARCFACE_TORCH_RECIPES[("webface42m", variant)].source == source
    assert c.model.arch == network and c.model.dtype == "bfloat16"
    assert (c.data.dataset, c.data.num_classes, c.data.num_examples) == (
        "webface42m",
        2_059_906,
        42_474_557,
    )
    # margin_list (1.0, 0.0, 0.4): CombinedMarginLoss's CosFace branch, s 64
    assert c.loss.to_dict() == {
        "name": "cosface",
        "s": 64.0,
        "m": 0.4,
        "probability_floor": 1e-30,
        "interclass_filtering_threshold": 0.0,
    }
    # torch.optim.AdamW(lr, weight_decay) with its default betas and eps, on every parameter
    assert (
        c.optim.optimizer,
        c.optim.lr,
        c.optim.weight_decay,
        tuple(c.optim.adam_betas),
        c.optim.adam_eps,
        c.optim.decay_batchnorm,
    ) == ("adamw", 0.001, 0.1, (0.9, 0.999), 1e-8, True)
    assert (c.global_batch, c.optim.accumulate_steps) == (per_gpu * gpus, acc)
    assert recipes.official_per_device_batch(c) == per_gpu
    assert (c.epochs, c.optim.warmup_epochs, c.head.sample_rate) == (epochs, warmup, sample_rate)
    assert (
        c.optim.schedule,
        c.optim.warmup_style,
        c.optim.grad_clip_norm,
        c.optim.grad_clip_eps,
    ) == ("poly", "arcface_torch", 5.0, 1e-6)
    assert (c.model.batchnorm_stats, c.head.freeze_unsampled) == ("per_device", False)
    assert config_check.problems(c) == []
    # the other arcface_torch loss file gives the same recipe; an explicit pfc still wins
    assert recipes.get_config("cosface", variant).to_dict() == c.to_dict()
    assert recipes.get_config("arcface", f"{variant},pfc0.1").head.sample_rate == 0.1


def test_vit_recipes_on_another_dataset_and_outside_arcface_torch():
    c = recipes.get_config("arcface", "vit_b,webface4m")
    assert (
        c.data.dataset,
        c.data.num_classes,
        c.optim.optimizer,
        c.optim.accumulate_steps,
        c.loss.name,
    ) == ("webface4m", 205_990, "adamw", 12, "cosface")
    with pytest.raises(ValueError, match="arcface_torch recipe; use configs/arcface.py:vit_t"):
        recipes.get_config("magface", "vit_t")


def test_demo_keeps_its_own_settings():
    c = recipes.get_config("arcface", "demo")
    assert (c.model.arch, c.optim.warmup_epochs, c.model.batchnorm_stats) == ("tiny", 0.5, "global")


def test_the_run_line_states_the_images_per_update():
    from magjax import train

    c = recipes.get_config("arcface", "vit_b")
    line = train.run_description(c, "/data/wf42m", 8, 20_739, 829_560)
    assert "global batch 2048 (12 per update: 24576 images) on 8 " in line
    line = train.run_description(recipes.get_config("arcface", "vit_t"), "/data", 8, 10, 400)
    assert "global batch 4096 on 8 " in line


def test_every_config_file_is_its_row_of_the_recipe_table():
    import pathlib

    names = sorted(path.stem for path in pathlib.Path("configs").glob("*.py"))
    assert names and set(names) <= set(recipes.RECIPES)
    for name in names:
        row = recipes.RECIPES[name]
        c = recipes.config_from_file(f"configs/{name}.py")
        assert (c.loss.name, c.data.dataset, c.model.arch, c.global_batch, c.epochs) == (
            name,
            row.dataset,
            row.backbones[row.backbone],
            row.global_batch,
            row.epochs,
        )
        assert (
            recipes.config_from_file(f"configs/{name}.py:tiny").model.arch
            == (row.backbones["tiny"])
        )
        # The variants list and override syntax live once, in magjax/recipes.py's docstring.
        assert "misspelt" not in pathlib.Path(f"configs/{name}.py").read_text()
