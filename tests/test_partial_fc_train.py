"""Partial FC with ``head.freeze_unsampled`` in the train step: the sampled-rows path (no dense
centre gradient) against the dense path that restores the unsampled rows."""

import dataclasses

import jax
import numpy as np
from test_bfloat16 import _batches

from magjax import head, parallel, recipes, train_step

CLASSES, BATCH, DEVICES = 512, 16, 8  # 64 centres per shard, 16 sampled


def _run(rows_gradient):
    config = recipes.get_config("arcface", "tiny,pfc0.25")
    config.model.update(dtype="float32", embedding_dim=32)
    config.head.freeze_unsampled = True
    config.global_batch = BATCH
    mesh = parallel.make_mesh(DEVICES)
    components = train_step.build_components(
        config, mesh, CLASSES, steps_per_epoch=10, total_steps=40
    )
    init_key, base_key = jax.random.split(jax.random.key(0))
    state = train_step.init_state(components, init_key)
    components.head = dataclasses.replace(components.head, rows_gradient=rows_gradient)
    assert components.head.sampled_rows == rows_gradient
    step = jax.jit(train_step.make_train_step(components, base_key))
    states = [state]
    for batch, _ in zip(_batches(), range(3), strict=False):
        batch = {"image": batch["image"], "label": batch["label"] * 7 % CLASSES}
        state, _ = step(state, parallel.global_batch(mesh, batch))
        states.append(jax.device_get(state))
    return states


def test_sampled_rows_path_equals_the_dense_path_and_moves_only_sampled_rows():
    rows_path, dense_path = _run(True), _run(False)
    for rows_state, dense_state in zip(rows_path[1:], dense_path[1:], strict=True):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
            rows_state["params"],
            dense_state["params"],
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
            rows_state["opt_state"],
            dense_state["opt_state"],
        )
    # Between two states, the centres and their momentum changed on at most the sampled
    # budget of rows per shard, and they did change there.
    before, after = rows_path[1], rows_path[2]
    for tree in ("params", "opt_state"):
        moved = jax.tree_util.tree_map_with_path(
            lambda path, a, b: (
                np.abs(np.asarray(a) - np.asarray(b)).sum(1) > 0
                if head.is_class_rows(path, a)
                else None
            ),
            before[tree],
            after[tree],
        )
        for rows in jax.tree.leaves(moved):
            per_shard = rows.reshape(DEVICES, -1)
            budget = head.partial_fc_budget(0.25, per_shard.shape[1], BATCH)
            assert 0 < per_shard.sum(1).max() <= budget
            assert per_shard.sum() < rows.size
