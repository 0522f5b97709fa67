"""``python -m magjax.bench backbone --convs``: every convolution of each family's Flax net is
matched to the same one of the PyTorch definition, a difference between the two nets is named,
and each convolution's passes are timed in both frameworks."""

import jax
import pytest

from magjax import models
from magjax.bench import backbone

PASSES = backbone.CONV_PASSES


def test_convs_times_each_convolution_in_both_frameworks(capsys, monkeypatch):
    # The stem, a 3x3, a strided 3x3 and a 1x1 convolution (compiling all 13 of the net's three
    # passes would take half a minute; their pairing is checked below).
    paired = backbone.paired_convolutions
    monkeypatch.setattr(backbone, "paired_convolutions", lambda *args: paired(*args)[:4])
    rows = backbone.bench_convolutions("tiny", 2, "float32", steps=1, warmup=0, with_torch=True)
    assert [row["name"] for row in rows] == [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.0.downsample.0",
    ]
    assert rows[0]["input"] == [112, 112, 3] and rows[3]["kernel"] == [1, 1]
    # The stem's input is the images: no input gradient, in either framework.
    assert not {"jax_input_grad_ms", "torch_input_grad_ms"} & set(rows[0])
    assert all(
        rows[0][f"{f}_{p}_ms"] > 0 for f in ("jax", "torch") for p in ("forward", "weight_grad")
    )
    for row in rows[1:]:
        assert all(row[f"{f}_{p}_ms"] > 0 for f in ("jax", "torch") for p in PASSES), row
    result = {}
    backbone._print_convolutions(rows, result)
    assert result["convolutions"] is rows
    for framework in ("jax", "torch"):
        total = sum(row.get(f"{framework}_{p}_ms", 0) for row in rows for p in PASSES)
        assert result[f"{framework}_conv_ms"] == pytest.approx(total, abs=0.01)
    assert "layer1.0.downsample.0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arch", ["tiny", "iresnet18", "magface_iresnet18", "ir_18", "mbf", "vit_demo"]
)
def test_each_family_has_the_same_convolutions_in_both_nets(arch):
    pairs = backbone.paired_convolutions(arch, 1, "float32", with_torch=True)
    variables = jax.eval_shape(
        lambda: models.build(arch).init(
            jax.random.key(0), jax.numpy.zeros((1, *models.INPUT_SHAPE)), train=False
        )
    )
    assert len(pairs) == sum(leaf.ndim == 4 for leaf in jax.tree.leaves(variables["params"]))
    assert all(torch_pair is not None for *_, torch_pair in pairs)
    # MobileFaceNet's grouped convolutions (depthwise but its first, of 64 groups of two).
    grouped = [row for row, *_ in pairs if row["groups"] > 1]
    if arch != "mbf":
        assert not grouped
        return
    assert sum(row["groups"] == row["input"][2] for row in grouped) == len(grouped) - 1 > 10
    assert all(row["out_channels"] == row["input"][2] for row in grouped)


def test_a_convolution_that_differs_between_the_nets_is_named(monkeypatch):
    found = backbone.torch_convolutions

    def with_other_stride(arch, batch):
        convs = found(arch, batch)
        convs["layer2.0.conv2"][0].stride = (1, 1)
        return convs

    monkeypatch.setattr(backbone, "torch_convolutions", with_other_stride)
    with pytest.raises(
        RuntimeError,
        match=r"convolution layer2\.0\.conv2 is .*\(2, 2\), 1\) "
        r"\(input.* in Flax, .*\(1, 1\), 1\) in PyTorch",
    ):
        backbone.paired_convolutions("tiny", 2, "float32", with_torch=True)
