"""magjax's training step against a PyTorch one, in float64 lockstep, for each loss family.

The PyTorch side is assembled here from the specification (docs/official-losses.md
sections 1-4 and 6), not from the official code: the backbone of magjax.models.torch_reference,
a margin head per family, ``torch.optim.SGD`` with each trainer's parameter groups,
``clip_grad_norm_`` on the backbone (arcface_torch) and the learning rate set per update from
each trainer's schedule. Both sides start from the same weights (magjax.convert maps them) and
take 5 steps on the same batches with momentum, weight decay and a changing learning rate;
parameters and AdaFace's EMA state must agree to 1e-12, BatchNorm running statistics to
1e-10 (relative to each tensor's largest value). The ViT case trains configs/arcface.py:vit_b's
recipe (AdamW, CosFace, gradient accumulation) on the CPU ViT against ``torch.optim.AdamW``
driven as arcface_torch's train_v2.py (parameters to 2e-12 absolute: see ADAMW_TOLERANCE).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's usual name)
from flax import traverse_util

from magjax import convert, models, parallel, recipes, train_step

BATCH = 8
CLASSES = 16
STEPS = 5
PARAMETER_TOLERANCE = 1e-12  # parameters and AdaFace's EMA
STATISTICS_TOLERANCE = 1e-10  # BatchNorm running statistics


# ---------------------------------------------------------------- PyTorch margin heads (spec)


def arcface_torch_head(embeddings, weight, labels, loss):
    """PartialFC_V2 (sample rate 1) + CombinedMarginLoss(64, 1, m, 0): the target cosine gets
    cos(theta + m) in the forward pass, with a straight-through gradient; softmax CE."""
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    target = cos.gather(1, labels[:, None])
    with torch.no_grad():
        delta = torch.cos(torch.arccos(target) + loss.m) - target
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(loss.s * (cos + onehot * delta), labels)


def magface_head(embeddings, weight, labels, loss):
    """MagLinear (easy margin) + MagLoss: CE + lambda_g * mean g(a), a = clamped norm."""
    a = embeddings.norm(dim=1, keepdim=True).clamp(loss.l_a, loss.u_a)
    margin = (loss.u_m - loss.l_m) / (loss.u_a - loss.l_a) * (a - loss.l_a) + loss.l_m
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    sin = torch.sqrt(1.0 - cos * cos)
    cos_margin = cos * torch.cos(margin) - sin * torch.sin(margin)
    cos_margin = torch.where(cos > 0, cos_margin, cos)
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    logits = loss.s * (onehot * cos_margin + (1 - onehot) * cos)
    g = a / loss.u_a**2 + 1.0 / a
    return F.cross_entropy(logits, labels) + loss.lambda_g * g.mean()


def adaface_head(embeddings, weight, labels, loss, state):
    """AdaFace: EMA of the detached, clipped norms' mean and unbiased std (updated first), then
    the angular and additive margins scaled by the norm's position in the batch."""
    eps = 1e-3
    norms = embeddings.norm(dim=1, keepdim=True)
    cos = F.linear(embeddings / norms, F.normalize(weight)).clamp(-1 + eps, 1 - eps)
    safe = norms.clip(0.001, 100).detach()
    with torch.no_grad():
        state["batch_mean"] = loss.t_alpha * safe.mean() + (1 - loss.t_alpha) * state["batch_mean"]
        state["batch_std"] = loss.t_alpha * safe.std() + (1 - loss.t_alpha) * state["batch_std"]
    scaler = ((safe - state["batch_mean"]) / (state["batch_std"] + eps) * loss.h).clip(-1, 1)
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    theta = torch.arccos(cos) - onehot * loss.m * scaler
    cos = torch.cos(theta.clip(eps, math.pi - eps)) - onehot * (loss.m + loss.m * scaler)
    return F.cross_entropy(loss.s * cos, labels)


# ------------------------------------------------------------------------- the two sides


def _config(loss_name):
    config = recipes.get_config(loss_name, "tiny")
    config.model.dtype = "float64"
    config.model.dropout = 0.0  # random masks cannot be shared between frameworks
    config.global_batch = BATCH
    if loss_name == "arcface":
        # 2 updates per epoch, warm-up of 2 then linear decay to 0 at 6: lr 0.1, 0.05, 0.1
        # (arcface_torch's first value); clip at 1 so that the clip acts at every step.
        config.optim.update(warmup_epochs=1.0, grad_clip_norm=1.0)
    else:
        config.optim.milestones = (1, 2)  # 1 update per epoch: lr 0.1, 0.01, 0.001
    return config


def _schedule_lr(config, update, steps_per_epoch, total_steps):
    """Each trainer's learning rate at update ``update`` (arcface_torch PolynomialLRWarmup,
    power 1, stepped per update; MultiStepLR x0.1 per milestone, stepped per epoch)."""
    lr = config.optim.lr
    if config.optim.schedule == "poly":
        warmup = int(config.optim.warmup_epochs * steps_per_epoch)
        if update == 0:
            return lr
        if update <= warmup:
            return lr * update / warmup
        return lr * (1 - (update - warmup) / (total_steps - warmup))
    epoch = update // steps_per_epoch
    return lr * 0.1 ** sum(epoch >= m for m in config.optim.milestones)


def _to_float64(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _torch_state_dict_of(variables):
    """A magjax backbone's variables as the PyTorch state_dict the converter reads (its inverse,
    checked by converting back)."""
    out = {}
    for (collection, *path), value in traverse_util.flatten_dict(variables).items():
        key = convert._torch_key(collection, tuple(path))
        value = np.asarray(value)
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel":
            value = value.T
            if key.startswith("fc."):  # rows in Flax's (H, W, C) flatten order -> (C, H, W)
                channels = variables["batch_stats"]["bn2"]["mean"].shape[0]
                side = math.isqrt(value.shape[1] // channels)
                value = value.reshape(-1, side, side, channels).transpose(0, 3, 1, 2)
                value = value.reshape(value.shape[0], -1)
        out[key] = value
    return out


def _ddp_forward(net, x, ranks):
    """The backbone under DDP with ``ranks`` GPUs, on one process: each rank's shard of the batch
    is normalised with its own BatchNorm statistics; the running statistics kept are rank 0's
    (DDP broadcasts rank 0's buffers before every forward, and saves rank 0's checkpoint)."""
    if ranks == 1:
        return net(x)
    before = {name: buffer.clone() for name, buffer in net.named_buffers()}
    outputs = []
    for rank, shard in enumerate(x.chunk(ranks)):
        _set_buffers(net, before)  # new tensors: autograd still holds the previous ones
        outputs.append(net(shard))
        if rank == 0:
            rank0 = {name: buffer.clone() for name, buffer in net.named_buffers()}
    _set_buffers(net, rank0)
    return torch.cat(outputs)


def _set_buffers(net, values):
    for name, value in values.items():
        module, _, attribute = name.rpartition(".")
        setattr(net.get_submodule(module), attribute, value.clone())


def _parameter_groups(loss_name, net, head_weight, weight_decay):
    trainable = [p for p in net.parameters() if p.requires_grad]
    if loss_name != "adaface":
        return [{"params": trainable}, {"params": [head_weight]}]
    # AdaFace: weight decay on the backbone's non-BatchNorm parameters and the head kernel only.
    batchnorm = [
        p
        for m in net.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
        if p.requires_grad
    ]
    others = [p for p in trainable if all(p is not q for q in batchnorm)]
    return [
        {"params": others + [head_weight], "weight_decay": weight_decay},
        {"params": batchnorm, "weight_decay": 0.0},
    ]


def _relative_difference(actual, expected):
    """Largest absolute difference relative to the tensor's largest magnitude, or to 1e-3 for
    smaller tensors: a BatchNorm bias followed by another BatchNorm has a gradient that is zero
    up to rounding, so both sides hold different rounding noise of ~1e-17 there."""
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(actual) - expected).max() / max(np.abs(expected).max(), 1e-3))


# ArcFace on 2 devices with the recipes' per-device BatchNorm statistics against 2 DDP ranks;
# AdaFace on 1 (magjax takes its EMA statistics over the global batch, the official code per GPU).
@pytest.mark.parametrize("loss_name, devices", [("arcface", 2), ("magface", 1), ("adaface", 1)])
def test_five_steps_match_pytorch(loss_name, devices, x64):
    from magjax.models import torch_reference

    config = _config(loss_name)
    assert config.model.batchnorm_stats == "per_device"
    steps_per_epoch = 2 if loss_name == "arcface" else 1
    total_steps = 6
    mesh = parallel.make_mesh(devices)
    components = train_step.build_components(config, mesh, CLASSES, steps_per_epoch, total_steps)
    state = _to_float64(train_step.init_state(components, jax.random.key(0)))
    step = jax.jit(train_step.make_train_step(components, jax.random.key(1)))

    # PyTorch side from the same weights.
    net = torch_reference.build_torch(config.model.arch, dropout=0.0).double().train()
    backbone = {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
    state_dict = _torch_state_dict_of(backbone)
    np.testing.assert_array_equal(  # the inverse mapping is right: converting back is exact
        traverse_util.flatten_dict(
            convert.convert_state_dict(state_dict, config.model.arch, np.float64)
        )[("params", "fc", "kernel")],
        state["params"]["backbone"]["fc"]["kernel"],
    )
    net.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=False
    )
    head_weight = torch.nn.Parameter(torch.from_numpy(np.array(state["params"]["head"]["weight"])))
    loss = components.loss
    optimizer = torch.optim.SGD(
        _parameter_groups(loss_name, net, head_weight, config.optim.weight_decay),
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
    )
    margin_state = {
        k: torch.tensor(float(v), dtype=torch.float64) for k, v in state["margin_state"].items()
    }

    rng = np.random.default_rng(0)
    for update in range(STEPS):
        images = rng.integers(0, 256, (BATCH, *models.INPUT_SHAPE), dtype=np.uint8)
        labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
        state, metrics = step(state, {"image": images, "label": labels})

        x = np.asarray(models.preprocess(images, components.input_spec, jnp.float64))
        embeddings = _ddp_forward(net, torch.from_numpy(x.transpose(0, 3, 1, 2)), devices)
        y = torch.from_numpy(labels.astype(np.int64))
        if loss_name == "arcface":
            value = arcface_torch_head(embeddings, head_weight, y, loss)
        elif loss_name == "magface":
            value = magface_head(embeddings, head_weight, y, loss)
        else:
            value = adaface_head(embeddings, head_weight, y, loss, margin_state)
        optimizer.zero_grad()
        value.backward()
        if config.optim.grad_clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.optim.grad_clip_norm)
            assert norm > config.optim.grad_clip_norm  # the clip acts
        lr = _schedule_lr(config, update, steps_per_epoch, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        np.testing.assert_allclose(float(metrics["loss"]), value.item(), rtol=1e-12)
        np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-14)

    expected = convert.convert_state_dict(
        {
            k: v.detach().numpy()
            for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")
        },
        config.model.arch,
        np.float64,
    )
    actual = traverse_util.flatten_dict(
        {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
    )
    differences = {
        path: _relative_difference(actual[path], value)
        for path, value in traverse_util.flatten_dict(expected).items()
    }
    differences["head weight"] = _relative_difference(
        state["params"]["head"]["weight"], head_weight.detach().numpy()
    )
    for kind, tolerance in (("params", PARAMETER_TOLERANCE), ("batch_stats", STATISTICS_TOLERANCE)):
        of_kind = {
            path: d
            for path, d in differences.items()
            if path[0] == kind or (kind == "params" and path == "head weight")
        }
        worst = max(of_kind, key=of_kind.get)
        assert of_kind[worst] <= tolerance, (worst, of_kind[worst])
    if loss_name == "adaface":
        for key, value in margin_state.items():
            np.testing.assert_allclose(
                float(state["margin_state"][key]), value.item(), rtol=PARAMETER_TOLERANCE
            )
    # The run moved everything it compares: a frozen comparison would pass trivially.
    moved = np.abs(np.asarray(state["batch_stats"]["features"]["var"]) - 1.0).max()
    assert moved > 1e-3


# ----------------------------------------------------------------------- the ViT with AdamW


def cosface_head(embeddings, weight, labels, s, m):
    """PartialFC_V2 (sample rate 1) + CombinedMarginLoss(s, 1, 0, m): its CosFace branch, the
    target logit s·(cos - m); softmax CE."""
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(s * (cos - m * onehot), labels)


def test_vit_adamw_with_accumulation_matches_pytorch(x64):
    """configs/arcface.py:vit_b's training (AdamW with weight decay on every parameter, CosFace,
    the clip at 5, gradient_acc) on the CPU ViT, 2 micro-batches per update, against
    torch.optim.AdamW driven as arcface_torch's train_v2.py drives it: each micro-batch's loss
    divided by gradient_acc and backpropagated, every 2nd micro-batch clip_grad_norm_(backbone,
    5) and the step, the scheduler stepped every micro-batch (warm-up 2 micro-batches, decay to 0
    at 6: the three updates at lr/2, 3lr/4, lr/4). 2 devices against 2 DDP ranks (the
    embedding head's BatchNorms per device)."""
    devices, accumulate, micro_batches, steps_per_epoch = 2, 2, 6, 2
    config = recipes.get_config("arcface", "vit_b")
    assert (config.optim.optimizer, config.loss.name, config.optim.grad_clip_norm) == (
        "adamw",
        "cosface",
        5.0,
    )
    config.model.update(arch="vit_demo", dtype="float64")
    config.head.sample_rate = 1.0
    config.global_batch = BATCH
    config.optim.update(accumulate_steps=accumulate, warmup_epochs=1.0)
    mesh = parallel.make_mesh(devices)
    components = train_step.build_components(config, mesh, CLASSES, steps_per_epoch, micro_batches)
    state = _to_float64(train_step.init_state(components, jax.random.key(0)))
    step = jax.jit(train_step.make_train_step(components, jax.random.key(1)))

    net = models.arch_spec("vit_demo").torch(None).double().train()
    state_dict = _torch_state_dict_of(
        {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
    )
    loaded = net.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=False
    )
    assert not loaded.unexpected_keys
    assert all(key.endswith("num_batches_tracked") for key in loaded.missing_keys)
    head_start = np.array(state["params"]["head"]["weight"])
    head_weight = torch.nn.Parameter(torch.from_numpy(head_start.copy()))
    # train_v2.py: both parameter lists, every tensor decayed; betas and eps left at their defaults
    optimizer = torch.optim.AdamW(
        [{"params": net.parameters()}, {"params": [head_weight]}],
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
    )

    def lr_at(micro_batch):  # PolynomialLRWarmup after `micro_batch` scheduler steps
        return _schedule_lr(config, micro_batch, steps_per_epoch, micro_batches)

    rng = np.random.default_rng(0)
    for global_step in range(1, micro_batches + 1):
        images = rng.integers(0, 256, (BATCH, *models.INPUT_SHAPE), dtype=np.uint8)
        labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
        state, metrics = step(state, {"image": images, "label": labels})

        x = np.asarray(models.preprocess(images, components.input_spec, jnp.float64))
        embeddings = _ddp_forward(net, torch.from_numpy(np.array(x.transpose(0, 3, 1, 2))), devices)
        value = cosface_head(
            embeddings,
            head_weight,
            torch.from_numpy(labels.astype(np.int64)),
            config.loss.s,
            config.loss.m,
        )
        (value / accumulate).backward()
        update_at = (global_step - 1) // accumulate * accumulate + accumulate - 1
        if global_step % accumulate == 0:
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.optim.grad_clip_norm)
            assert norm > config.optim.grad_clip_norm  # the clip acts
            assert global_step - 1 == update_at
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step - 1)
            optimizer.step()
            optimizer.zero_grad()
        np.testing.assert_allclose(float(metrics["loss"]), value.item(), rtol=1e-12)
        # the rate of the update this micro-batch's gradient goes into
        np.testing.assert_allclose(float(metrics["lr"]), lr_at(update_at), rtol=1e-14)
    assert [lr_at(k) for k in (1, 3, 5)] == pytest.approx(
        [config.optim.lr / 2, 3 * config.optim.lr / 4, config.optim.lr / 4], rel=1e-12
    )

    expected = traverse_util.flatten_dict(
        convert.convert_state_dict(
            {
                k: v.detach().numpy()
                for k, v in net.state_dict().items()
                if not k.endswith("num_batches_tracked")
            },
            "vit_demo",
            np.float64,
        )
    )
    actual = traverse_util.flatten_dict(
        {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
    )
    start = traverse_util.flatten_dict(
        convert.convert_state_dict(state_dict, "vit_demo", np.float64)
    )
    expected[("params", "head weight")] = head_weight.detach().numpy()
    actual[("params", "head weight")] = state["params"]["head"]["weight"]
    start[("params", "head weight")] = head_start
    # Without masking mask_token takes no part: PyTorch's AdamW skips it (no grad), magjax
    # neither decays nor moves it (models.trainable_mask).
    np.testing.assert_array_equal(actual[("params", "mask_token")], start[("params", "mask_token")])
    np.testing.assert_array_equal(
        expected[("params", "mask_token")], start[("params", "mask_token")]
    )
    for path, value in expected.items():
        if path[0] == "batch_stats":
            assert _relative_difference(actual[path], value) <= STATISTICS_TOLERANCE, path
        elif path in VIT_ZERO_GRADIENT:
            # Both sides keep them at 0 up to AdamW's lr·noise/eps steps (about 1e-12).
            assert np.abs(actual[path]).max() < 1e-10 and np.abs(value).max() < 1e-10, path
        elif path[-1] != "mask_token":
            assert np.abs(np.asarray(actual[path]) - value).max() <= ADAMW_TOLERANCE, path
            # AdamW moves each parameter by about lr per update: none stood still.
            assert np.abs(value - start[path]).max() > 1e-4, path


# AdamW divides each gradient element by its magnitude plus eps 1e-8: where an element is near
# eps, PyTorch's and XLA's float64 roundings of it (~1e-17 apart) move the step by up to
# lr·1e-17/eps ~ 1e-12; measured at most 8e-13 (the embedding Linear feature_0), absolute.
ADAMW_TOLERANCE = 2e-12
# Biases whose gradient is zero but for rounding (~1e-18): a constant shift of every sample's
# features that the next BatchNorm's batch mean removes (the final LayerNorm's bias before
# feature_0 -> feature_1, feature_1's bias before feature_2 -> feature_3); AdamW normalises
# that noise, so neither side holds a value worth comparing, only that it stays near 0.
VIT_ZERO_GRADIENT = {("params", "norm", "bias"), ("params", "feature_1", "bias")}
