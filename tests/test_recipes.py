"""The recipes carry the official hyper-parameters (rows of the table in magjax/recipes.py)."""

import pytest

from magjax import recipes


@pytest.mark.parametrize("loss, variants, expected", [
    # arcface_torch configs/ms1mv2_r50.py
    ("arcface", None, dict(arch="iresnet50", dataset="ms1mv2", lr=0.1, wd=5e-4, epochs=20,
                           m=0.5, sample_rate=1.0)),
    # configs/ms1mv2_mbf.py: weight decay 1e-4, 40 epochs
    ("arcface", "mbf", dict(arch="mbf", dataset="ms1mv2", lr=0.1, wd=1e-4, epochs=40, m=0.5,
                            sample_rate=1.0)),
    ("arcface", "ms1mv3,mbf", dict(arch="mbf", dataset="ms1mv3", wd=1e-4, epochs=40)),
    # configs/glint360k_r100.py: CosFace (1, 0, 0.4), weight decay 1e-4
    ("cosface", "glint360k,r100", dict(arch="iresnet100", dataset="glint360k", lr=0.1,
                                       wd=1e-4, epochs=20, m=0.4, sample_rate=1.0)),
    ("cosface", "glint360k,mbf", dict(arch="mbf", wd=1e-4, epochs=20)),
    # configs/wf4m_r50.py and wf4m_mbf.py
    ("cosface", None, dict(arch="iresnet50", dataset="webface4m", wd=5e-4, epochs=20, m=0.4)),
    ("cosface", "mbf", dict(arch="mbf", dataset="webface4m", wd=1e-4, epochs=20)),
    ("cosface", "webface12m,mbf", dict(wd=1e-4, epochs=20)),
    # configs/wf42m_pfc02_r100.py: Partial FC 0.2, which an explicit pfc variant overrides
    ("cosface", "webface42m,r100", dict(wd=5e-4, sample_rate=0.2)),
    ("cosface", "r100,webface42m,pfc0.1", dict(sample_rate=0.1)),
    # MagFace run/run.sh, AdaFace scripts/run_ir101_ms1mv2.sh
    ("magface", "r100", dict(arch="magface_iresnet100", lr=0.1, wd=5e-4, epochs=25,
                             batch=512)),
    ("adaface", "r100", dict(arch="ir_101", lr=0.1, wd=5e-4, epochs=26, batch=512, m=0.4)),
    ("curricularface", None, dict(arch="iresnet100", dataset="ms1mv2", lr=0.1, wd=5e-4,
                                  epochs=24, batch=512, m=0.5)),
])
def test_official_hyper_parameters(loss, variants, expected):
    c = recipes.get_config(loss, variants)
    actual = dict(arch=c.model.arch, dataset=c.data.dataset, lr=c.optim.lr,
                  wd=c.optim.weight_decay, epochs=c.epochs, m=c.loss.get("m"),
                  sample_rate=c.head.sample_rate, batch=c.global_batch)
    assert {key: actual[key] for key in expected} == expected
    assert c.model.batchnorm_stats == "per_device"  # every official trainer's BatchNorm


def test_every_arcface_torch_recipe_follows_its_trainer():
    for (dataset, backbone), recipe in recipes.ARCFACE_TORCH_RECIPES.items():
        c = recipes.get_config("cosface", f"{dataset},{backbone}")
        assert (c.optim.lr, c.optim.weight_decay, c.epochs) == (
            recipe.lr, recipe.weight_decay, recipe.epochs), recipe.source
        assert c.global_batch == 1024 and c.optim.grad_clip_norm == 5.0
        assert c.optim.grad_clip_eps == 1e-6 and c.optim.warmup_style == "arcface_torch"


def test_demo_keeps_its_own_settings():
    c = recipes.get_config("arcface", "demo")
    assert (c.model.arch, c.optim.warmup_epochs, c.model.batchnorm_stats) == (
        "tiny", 0.5, "global")
