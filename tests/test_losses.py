"""magjax.losses against an independent float64 NumPy implementation, finite differences, the
official reference values, and the float32/bf16/jit/vmap paths."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpy_losses as ref
import pytest
from conftest import FIXTURES

from magjax import losses
from magjax.losses import arcface, base, magface
from magjax.refcheck import loss_cases

LOSS_REFS = json.loads((FIXTURES / "loss_refs.json").read_text())
CURRICULARFACE_REFS = json.loads((FIXTURES / "curricularface_refs.json").read_text())


def make_inputs(seed, batch, classes, dim, thetas=None, norms=None, labels=None):
    """Embeddings whose target angle is ``thetas`` (radians) and whose norms are ``norms``."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.05, (classes, dim))
    y = rng.integers(0, classes, batch) if labels is None else np.asarray(labels)
    if thetas is None:
        thetas = rng.uniform(0.2, np.pi - 0.2, batch)
    if norms is None:
        norms = rng.uniform(5, 60, batch)
    w = W[y] / np.linalg.norm(W[y], axis=1, keepdims=True)
    noise = rng.normal(size=(batch, dim))
    ortho = noise - (noise * w).sum(1, keepdims=True) * w
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    x = np.cos(thetas)[:, None] * w + np.sin(thetas)[:, None] * ortho
    return x * np.asarray(norms, dtype=np.float64)[:, None], W, y


def jax_loss(loss, x, W, y, state=None):
    out = jax.jit(lambda x, W, y, st: loss_cases.value_and_grads(x, W, y, loss, st))(
        jnp.asarray(x), jnp.asarray(W), jnp.asarray(y), state if state else loss.initial_state()
    )
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "case", LOSS_REFS["cases"] + CURRICULARFACE_REFS["cases"], ids=lambda c: c["name"]
)
def test_official_reference_cases(case, dtype, x64):
    passed, detail = loss_cases.check_case(case, dtype, mesh_devices=0)
    assert passed, detail


# Edge inputs: target angles near 0 and π (θ + m > π included), a spread in between.
EDGE_THETAS = np.array([1e-4, 0.05, 0.8, 1.5, 2.5, 2.9, np.pi - 0.3, np.pi - 1e-3])


@pytest.mark.parametrize("variant", ["insightface", "paper", "classic", "easy"])
def test_arcface_matches_numpy(variant, x64):
    x, W, y = make_inputs(0, len(EDGE_THETAS), 11, 16, thetas=EDGE_THETAS)
    # The insightface variant keeps arcface_torch's 1e-30 floor (several rows here are capped);
    # the exact-autodiff variants are checked uncapped, against finite differences.
    floor = 1e-30 if variant == "insightface" else None
    loss = losses.MarginLoss.create(
        "arcface", s=64.0, m=0.5, variant=variant, probability_floor=floor
    )
    got = jax_loss(loss, x, W, y)
    expected = ref.arcface(x, W, y, 64.0, 0.5, variant, floor=floor)
    np.testing.assert_allclose(got["loss"], expected, rtol=1e-12)
    if variant == "insightface":
        gap = got["logits"].max(1) - got["logits"][np.arange(len(y)), y]
        assert (gap > 70).sum() >= 3  # capped rows: p < 1e-30
        gx, gw = ref.insightface_grads(x, W, y, 64.0, lambda c: np.cos(np.arccos(c) + 0.5))
    else:
        f = lambda x, W: ref.arcface(x, W, y, 64.0, 0.5, variant)  # noqa: E731
        gx = ref.finite_difference(f, x, W, index=0)
        gw = ref.finite_difference(f, x, W, index=1)
    # Central differences near θ = π (1/sin θ = 1000) are good to ~1e-5 relative.
    np.testing.assert_allclose(got["grad_embeddings"], gx, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["grad_weight"], gw, rtol=1e-4, atol=1e-7)


def test_insightface_arcface_is_non_monotone_without_fallback(x64):
    """θ + m > π: arcface_torch returns cos(θ + m), which rises again; 'classic' falls back."""
    c = jnp.cos(jnp.array([np.pi - 0.4, np.pi - 0.2]))
    official = arcface.arcface_target(c, 0.5, "insightface")
    assert official[1] > official[0]
    classic = arcface.arcface_target(c, 0.5, "classic")
    np.testing.assert_allclose(classic, c - 0.5 * np.sin(0.5), rtol=1e-14)
    # Straight-through: d target / d c = 1 whatever θ is.
    grad = jax.grad(lambda c: arcface.arcface_target(c, 0.5, "insightface").sum())(c)
    np.testing.assert_array_equal(grad, np.ones(2))


@pytest.mark.parametrize("labels", [None, [3, 3, 3, 1, 1, 0]])
def test_cosface_matches_numpy(labels, x64):
    x, W, y = make_inputs(1, 6, 7, 10, labels=labels)
    loss = losses.MarginLoss.create("cosface", s=30.0, m=0.35)
    got = jax_loss(loss, x, W, y)
    np.testing.assert_allclose(got["loss"], ref.cosface(x, W, y, 30.0, 0.35, 1e-30), rtol=1e-12)
    gx, gw = ref.insightface_grads(x, W, y, 30.0, lambda c: c - 0.35)
    np.testing.assert_allclose(got["grad_embeddings"], gx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["grad_weight"], gw, rtol=1e-9, atol=1e-12)


def test_probability_floor_caps_loss_but_not_gradient(x64):
    """A row with p < 1e-30 contributes exactly 69.0776 but the full softmax gradient."""
    logits = jnp.array([[0.0, 100.0, 0.0], [1.0, 0.0, 0.0]])  # [B, C]; targets in column 0
    labels = jnp.array([0, 0])
    onehot = jax.nn.one_hot(labels, 3)
    loss = losses.MarginLoss.create("cosface", s=100.0, m=0.0)

    def f(z):
        cos = z.T / loss.s
        return losses.margin_cross_entropy(cos, labels, z[:, 0], loss)

    value, grad = jax.value_and_grad(f)(logits)
    row1 = -np.log(np.exp(1.0) / (np.exp(1.0) + 2))
    np.testing.assert_allclose(value, (-np.log(1e-30) + row1) / 2, rtol=1e-13)
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(grad, (softmax - onehot) / 2, rtol=1e-12, atol=1e-300)


def test_combined_insightface_semantics(x64):
    x, W, y = make_inputs(2, 5, 6, 8)
    arc = jax_loss(losses.MarginLoss.create("arcface", m=0.3), x, W, y)
    comb_arc = jax_loss(losses.MarginLoss.create("combined", m1=1.0, m2=0.3, m3=0.0), x, W, y)
    cos = jax_loss(losses.MarginLoss.create("cosface", m=0.2), x, W, y)
    comb_cos = jax_loss(losses.MarginLoss.create("combined", m1=1.0, m2=0.3, m3=0.2), x, W, y)
    for key in ("loss", "grad_embeddings", "grad_weight"):
        np.testing.assert_array_equal(arc[key], comb_arc[key])
        np.testing.assert_array_equal(cos[key], comb_cos[key])
    with pytest.raises(ValueError, match="CombinedMarginLoss"):
        jax_loss(losses.MarginLoss.create("combined", m1=1.35, m2=0.0, m3=0.0), x, W, y)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (0.9, 0.4, 0.15)])
def test_combined_paper_matches_numpy_and_finite_differences(margins, x64):
    x, W, y = make_inputs(3, 5, 6, 8, norms=np.ones(5) * 2)
    loss = losses.MarginLoss.create(
        "combined",
        m1=margins[0],
        m2=margins[1],
        m3=margins[2],
        s=16.0,
        variant="paper",
        probability_floor=None,
    )
    got = jax_loss(loss, x, W, y)
    f = lambda x, W: ref.combined_paper(x, W, y, 16.0, *margins)  # noqa: E731
    np.testing.assert_allclose(got["loss"], f(x, W), rtol=1e-12)
    np.testing.assert_allclose(
        got["grad_embeddings"], ref.finite_difference(f, x, W, index=0), rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(
        got["grad_weight"], ref.finite_difference(f, x, W, index=1), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("easy_margin", [True, False])
@pytest.mark.parametrize(
    "norms",
    [
        np.array([4.0, 10.5, 30.0, 60.0, 109.0, 150.0, 20.0, 80.0]),  # below / inside / above
        np.array([55.0]),
    ],  # a batch of one
)
def test_magface_matches_numpy_and_finite_differences(norms, easy_margin, x64):
    thetas = np.linspace(0.1, np.pi - 0.1, len(norms))
    x, W, y = make_inputs(4, len(norms), 9, 12, thetas=thetas, norms=norms)
    hp = dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)
    loss = losses.MarginLoss.create("magface", easy_margin=easy_margin, **hp)
    got = jax_loss(loss, x, W, y)
    f = lambda x, W: ref.magface(x, W, y, easy_margin=easy_margin, **hp)  # noqa: E731
    np.testing.assert_allclose(got["loss"], f(x, W), rtol=1e-12)
    np.testing.assert_allclose(
        got["grad_embeddings"], ref.finite_difference(f, x, W, index=0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        got["grad_weight"], ref.finite_difference(f, x, W, index=1), rtol=1e-5, atol=1e-7
    )


def test_magface_regularizer_and_lambda_bound():
    a = np.linspace(10, 110, 101)
    g = np.asarray(magface.magface_regularizer(jnp.asarray(a), 110.0))
    assert np.argmin(g) == len(a) - 1 and np.all(np.diff(g) < 0)  # decreasing up to u_a
    np.testing.assert_allclose(
        magface.magface_min_lambda_g(64, 10, 110, 0.45, 0.8),
        64 * 0.0035 * 110**2 * 10**2 / (110**2 - 10**2),
    )
    assert 22.5 < magface.magface_min_lambda_g(64, 10, 110, 0.45, 0.8) < 22.7


@pytest.mark.parametrize("t_alpha,h", [(0.01, 0.333), (1.0, 0.333), (0.5, 1.0)])
def test_adaface_state_over_steps_matches_numpy(t_alpha, h, x64):
    loss = losses.MarginLoss.create("adaface", s=64.0, m=0.4, h=h, t_alpha=t_alpha)
    state_np = (20.0, 100.0)
    state_jax = loss.initial_state()
    for step in range(4):
        norms = np.array([0.0005, 3.0, 15.0, 40.0, 99.0, 150.0]) * (1 + step / 3)
        norms[0] = 0.0005  # below AdaFace's 1e-3 norm clip at every step
        thetas = np.array([1e-3, 0.04, 1.0, 2.0, 3.1, np.pi - 1e-3])
        x, W, y = make_inputs(10 + step, 6, 7, 8, thetas=thetas, norms=norms)
        got = jax_loss(loss, x, W, y, state_jax)
        expected, state_np = ref.adaface(x, W, y, 64.0, 0.4, h, t_alpha, state_np)
        np.testing.assert_allclose(got["loss"], expected, rtol=1e-12)
        np.testing.assert_allclose(
            [got["state_after"]["batch_mean"], got["state_after"]["batch_std"]],
            state_np,
            rtol=1e-13,
        )
        # Norms are detached in the head: finite differences with the margin's norms frozen.
        frozen = np.linalg.norm(x, axis=1)
        before = (state_jax["batch_mean"], state_jax["batch_std"])
        f = lambda x, W, y=y, before=before, frozen=frozen: ref.adaface(  # noqa: E731
            x, W, y, 64.0, 0.4, h, t_alpha, before, norms_for_margin=frozen
        )[0]
        # Row 0 (norm 5e-4) is too small for finite differences to resolve; with the norms
        # detached the loss depends on x only through x/||x||, so grad · x = 0 on every row.
        fd = ref.finite_difference(f, x, W, index=0)
        np.testing.assert_allclose(got["grad_embeddings"][1:], fd[1:], rtol=1e-5, atol=1e-8)
        g = got["grad_embeddings"]
        cosine = (g * x).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(g, axis=1))
        np.testing.assert_allclose(cosine, 0.0, atol=1e-12)
        np.testing.assert_allclose(
            got["grad_weight"], ref.finite_difference(f, x, W, index=1), rtol=1e-5, atol=1e-8
        )
        state_jax = got["state_after"]


@pytest.mark.parametrize("m", [0.5, 0.3])
def test_curricularface_over_steps_matches_numpy_and_finite_differences(m, x64):
    """Values, t and gradients against float64 NumPy: targets from θ ≈ 0 to past π - m (the
    fallback), hard and easy non-targets in each row, t carried over 3 steps."""
    loss = losses.MarginLoss.create("curricularface", m=m)
    t_np = 0.0
    state = loss.initial_state()
    thetas = np.array([0.3, 1.0, 1.6, 2.2, np.pi - m + 0.2, np.pi - 0.05])
    for step in range(3):
        x, W, y = make_inputs(20 + step, len(thetas), 9, 12, thetas=thetas)
        got = jax_loss(loss, x, W, y, state)
        expected, t_after = ref.curricularface(x, W, y, 64.0, m, t_np)
        np.testing.assert_allclose(got["loss"], expected, rtol=1e-12)
        np.testing.assert_allclose(got["state_after"]["t"], t_after, rtol=1e-13)
        c = ref._cos(x, W)
        threshold = np.cos(np.arccos(c[np.arange(len(y)), y]) + m)
        hard = (c > threshold[:, None]) & (np.arange(9)[None, :] != y[:, None])
        assert hard.any() and (~hard).any()  # both kinds of non-targets are exercised
        # t carries no gradient: finite differences with this step's t frozen.
        f = lambda x, W, y=y, t=t_np, t_after=t_after: ref.curricularface(  # noqa: E731
            x, W, y, 64.0, m, t, t_for_logits=t_after
        )[0]
        np.testing.assert_allclose(
            got["grad_embeddings"], ref.finite_difference(f, x, W, index=0), rtol=1e-5, atol=1e-8
        )
        np.testing.assert_allclose(
            got["grad_weight"], ref.finite_difference(f, x, W, index=1), rtol=1e-5, atol=1e-8
        )
        state, t_np = got["state_after"], t_after


def test_adaface_batch_of_one_is_nan_as_official(x64):
    """torch.std of one value is NaN (unbiased), so the official head yields NaN."""
    loss = losses.MarginLoss.create("adaface")
    x, W, y = make_inputs(5, 1, 4, 6)
    got = jax_loss(loss, x, W, y)
    assert np.isnan(got["state_after"]["batch_std"]) and np.isnan(got["loss"])


def test_masked_rows_change_nothing(x64):
    """Padded rows (mask false) leave loss, gradients and AdaFace statistics unchanged."""
    loss = losses.MarginLoss.create("adaface", t_alpha=0.5)
    x, W, y = make_inputs(6, 5, 7, 8)
    pad_x = np.concatenate([x, np.ones((3, 8)) * 7.0])
    pad_y = np.concatenate([y, [0, 1, 2]])
    mask = np.arange(8) < 5

    def total(x, W, y, mask):
        cos, target_cos = losses.cosine_similarity(x, W, y)
        norms = jnp.linalg.norm(x, axis=-1)
        value, _, state = losses.margin_loss(
            cos, target_cos, y, norms, loss, loss.initial_state(), row_mask=mask
        )
        return value, state

    (v1, s1), g1 = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, W, y, None)
    (v2, s2), g2 = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(pad_x, W, pad_y, mask)
    np.testing.assert_allclose(v2, v1, rtol=1e-13)
    np.testing.assert_allclose(g2[0][:5], g1[0], rtol=1e-12, atol=1e-16)
    np.testing.assert_array_equal(g2[0][5:], 0.0)
    np.testing.assert_allclose(g2[1], g1[1], rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(
        [s2["batch_mean"], s2["batch_std"]], [s1["batch_mean"], s1["batch_std"]], rtol=1e-13
    )


def test_interclass_filtering_zeroes_confusing_negatives(x64):
    x, W, y = make_inputs(7, 4, 6, 8)
    W[(y + 1) % 6] = x / np.linalg.norm(x, axis=1, keepdims=True) + 0.01  # near-duplicates
    base = losses.MarginLoss.create("cosface")
    filtered = losses.MarginLoss.create("cosface", interclass_filtering_threshold=0.5)
    logits = jax_loss(base, x, W, y)["logits"]
    logits_f = jax_loss(filtered, x, W, y)["logits"]
    c = ref._cos(x, W)
    rows = np.arange(4)
    expected = np.where(c > 0.5, 0.0, c) * 64
    expected[rows, y] = logits[rows, y]
    np.testing.assert_allclose(logits_f, expected, rtol=1e-12, atol=1e-12)
    assert (logits_f != logits).any()


def test_cosine_vjp_matches_autodiff_of_normalised_product(x64):
    """The hand-written VJP of the class-major cosines (centres scaled, not normalised, target
    cosines gathered) equals autodiff of the textbook formula, a zero centre included."""
    rng = np.random.default_rng(5)
    x, W = rng.normal(size=(6, 8)) * 3.0, rng.normal(size=(7, 8)) * 0.2
    W[2] = 0.0  # a padding row: safe_norm's floor, no gradient through the norm
    labels = np.array([0, 3, 6, 3, -1, 9])  # -1 and 9: labels this block does not hold
    cotangent_cos, cotangent_target = rng.normal(size=(7, 6)), rng.normal(size=6)

    def textbook(x, W):
        cos = losses.l2_normalize(W) @ losses.l2_normalize(x).T
        held = (labels >= 0) & (labels < 7)
        target = jnp.where(held, cos[np.clip(labels, 0, 6), np.arange(6)], 0.0)
        return (cos * cotangent_cos).sum() + (target * cotangent_target).sum()

    def ours(x, W):
        cos, target = losses.cosine_similarity(x, W, jnp.asarray(labels))
        return (cos * cotangent_cos).sum() + (target * cotangent_target).sum()

    expected = jax.value_and_grad(textbook, (0, 1))(x, W)
    got = jax.value_and_grad(ours, (0, 1))(x, W)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-13)
    for g, e in zip(got[1], expected[1], strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize(
    "loss",
    [
        losses.MarginLoss.create("arcface"),
        losses.MarginLoss.create("adaface"),  # bound 1 - eps
        losses.MarginLoss.create("cosface", interclass_filtering_threshold=0.3),
    ],
    ids=["arcface", "adaface", "cosface_filtered"],
)
def test_sum_exp_vjp_matches_autodiff_at_clamped_and_filtered_cosines(loss, x64):
    """The sum of exponentials' hand-written VJP (one signed residual) equals autodiff of the
    plain formula where the clamp and the filter cut the gradient, at the bound itself
    (torch.clamp passes it there), and with masked classes and labels outside the block."""
    rng = np.random.default_rng(11)
    bound = loss.cosine_bound
    cos = rng.uniform(-1.0, 1.0, (9, 5))
    cos[0, :] = [bound + 1e-3, -bound - 1e-3, bound, -bound, 0.5]  # beyond, at the bound
    cos[1, :] = [0.31, 0.29, 0.99, -0.99, 1.2]  # around the filter's threshold
    labels = jnp.array([2, 3, 8, -1, 11])  # -1, 11: labels this block does not hold
    class_mask = jnp.arange(9) < 8  # class 8: padding
    shift = jnp.asarray(rng.uniform(0.0, 10.0, 5))
    cotangent = rng.normal(size=5)

    def ours(cos):
        return (base._sum_exp_over_classes(loss, cos, labels, class_mask, shift) * cotangent).sum()

    def plain(cos):
        logits = loss.non_target_logits(cos, None)
        return (base._shifted_exp(logits, labels, class_mask, shift).sum(axis=0) * cotangent).sum()

    value, grad = jax.value_and_grad(ours)(jnp.asarray(cos))
    expected_value, expected_grad = jax.value_and_grad(plain)(jnp.asarray(cos))
    np.testing.assert_allclose(value, expected_value, rtol=1e-13)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-300)
    grad = np.asarray(grad)
    assert grad[0, 0] == 0 and grad[0, 1] == 0  # beyond the bound: cut
    assert grad[0, 3] != 0  # at the bound: passed
    filtered = getattr(loss, "interclass_filtering_threshold", 0) > 0
    assert (grad[0, 2] == 0) == filtered  # +bound: filtered
    if filtered:
        np.testing.assert_array_equal(grad[1] == 0, [True, False, True, False, True])


@pytest.mark.parametrize("s", [64.0, 100.0])  # s = 100: float32 shifts by the largest cosine
@pytest.mark.parametrize("scenario", ["all_opposite", "confidently_wrong"])
def test_float32_extreme_cosines_match_float64(scenario, s, x64):
    """Every cosine near -1 (the sum of exponentials must not underflow), or a non-target near
    +1 over a target near -1 (must not overflow): float32 agrees with float64."""
    rng = np.random.default_rng(11)
    u = rng.normal(size=16)
    u /= np.linalg.norm(u)
    W = -u + 0.02 * rng.normal(size=(5, 16))
    if scenario == "confidently_wrong":
        W[4] = u + 0.02 * rng.normal(size=16)
    x = np.stack([30.0 * u, 45.0 * u])
    y = np.array([0, 1])
    loss = losses.MarginLoss.create("magface", s=s)
    exact = jax_loss(loss, x, W, y)
    single = jax_loss(loss, x.astype(np.float32), W.astype(np.float32), y)
    assert single["loss"].dtype == np.float32
    np.testing.assert_allclose(single["loss"], exact["loss"], rtol=2e-6)
    for name in ("grad_embeddings", "grad_weight"):
        scale = np.abs(exact[name]).max()
        np.testing.assert_allclose(single[name], exact[name], rtol=1e-3, atol=1e-5 * scale)


def test_bf16_embeddings_give_float32_head():
    x, W, y = make_inputs(8, 4, 5, 16)
    loss = losses.MarginLoss.create("arcface")
    xb = jnp.asarray(x, jnp.bfloat16)
    value, metrics, _ = losses.dense_loss(xb, jnp.asarray(W, jnp.float32), jnp.asarray(y), loss)
    assert metrics["logits"].dtype == jnp.float32 and value.dtype == jnp.float32
    grad = jax.grad(
        lambda x: losses.dense_loss(x, jnp.asarray(W, jnp.float32), jnp.asarray(y), loss)[0]
    )(xb)
    assert grad.dtype == jnp.bfloat16
    # bf16 inputs carry ~3 significant digits; the loss from them agrees to that level.
    exact = ref.arcface(np.asarray(xb.astype(jnp.float32)), W, y, 64.0, 0.5, "insightface", 1e-30)
    np.testing.assert_allclose(value, exact, rtol=1e-4)


def test_jit_and_vmap_over_independent_problems():
    loss = losses.MarginLoss.create("magface")
    problems = [make_inputs(20 + i, 4, 5, 8) for i in range(3)]
    xs = jnp.asarray(np.stack([p[0] for p in problems]), jnp.float32)
    Ws = jnp.asarray(np.stack([p[1] for p in problems]), jnp.float32)
    ys = jnp.asarray(np.stack([p[2] for p in problems]))
    batched = jax.jit(jax.vmap(lambda x, W, y: losses.dense_loss(x, W, y, loss)[0]))(xs, Ws, ys)
    for i, (x, W, y) in enumerate(problems):
        expected = ref.magface(x, W, y, 64.0, 10.0, 110.0, 0.45, 0.8, 35.0, True)
        np.testing.assert_allclose(batched[i], expected, rtol=2e-5)


def test_unknown_loss_and_hparams_are_named():
    with pytest.raises(ValueError, match="unknown loss 'sphereface'"):
        losses.MarginLoss.create("sphereface")
    with pytest.raises(ValueError, match="margin_typo"):
        losses.MarginLoss.create("arcface", margin_typo=0.3)
