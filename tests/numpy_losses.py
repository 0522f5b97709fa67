"""Independent float64 NumPy forward passes of every margin loss, written from the spec
(docs/official-losses.md), with no code shared with magjax.losses.

Each function returns the total loss for raw embeddings x [B, d], centres W [C, d] and labels y.
Gradients are checked against central finite differences of these functions, or, for the
straight-through arcface_torch margin, against the closed form in ``insightface_grads``.
"""

import numpy as np


def _cos(x, W, bound=1.0):
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    Wn = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    return np.clip(xn @ Wn.T, -bound, bound)


def _ce_rows(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _with_target(c, y, target):
    out = c.copy()
    out[np.arange(len(y)), y] = target
    return out


def arcface(x, W, y, s, m, variant, floor=None):
    c = _cos(x, W)
    ct = c[np.arange(len(y)), y]
    theta = np.arccos(ct)
    if variant in ("insightface", "paper"):
        t = np.cos(theta + m)
    elif variant == "classic":
        t = np.where(theta + m <= np.pi, np.cos(theta + m), ct - m * np.sin(m))
    elif variant == "easy":
        t = np.where(ct > 0, np.cos(theta + m), ct)
    return _ce(s * _with_target(c, y, t), y, floor)


def cosface(x, W, y, s, m, floor=None):
    c = _cos(x, W)
    return _ce(s * _with_target(c, y, c[np.arange(len(y)), y] - m), y, floor)


def combined_paper(x, W, y, s, m1, m2, m3):
    c = _cos(x, W)
    theta = np.arccos(c[np.arange(len(y)), y])
    return _ce(s * _with_target(c, y, np.cos(m1 * theta + m2) - m3), y, None)


def magface(x, W, y, s, l_a, u_a, l_m, u_m, lambda_g, easy_margin):
    a = np.clip(np.linalg.norm(x, axis=1), l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    c = _cos(x, W)
    ct = c[np.arange(len(y)), y]
    theta = np.arccos(ct)
    if easy_margin:
        t = np.where(ct > 0, np.cos(theta + m), ct)
    else:
        t = np.where(theta + m < np.pi, np.cos(theta + m), ct - m * np.sin(m))
    g = a / u_a**2 + 1 / a
    return _ce(s * _with_target(c, y, t), y, None) + lambda_g * g.mean()


def adaface(x, W, y, s, m, h, t_alpha, state, norms_for_margin=None):
    """Returns (loss, new_state). ``norms_for_margin`` freezes the (detached) norms for FD."""
    eps = 1e-3
    norms = np.linalg.norm(x, axis=1) if norms_for_margin is None else norms_for_margin
    safe = np.clip(norms, 1e-3, 100)
    mean = t_alpha * safe.mean() + (1 - t_alpha) * state[0]
    std = t_alpha * safe.std(ddof=1) + (1 - t_alpha) * state[1]
    ms = np.clip(h * (safe - mean) / (std + eps), -1, 1)
    c = _cos(x, W, bound=1 - eps)
    theta = np.arccos(c)
    rows = np.arange(len(y))
    theta[rows, y] -= m * ms
    out = np.cos(np.clip(theta, eps, np.pi - eps))
    out[rows, y] -= m + m * ms
    return _ce(s * out, y, None), (mean, std)


def curricularface(x, W, y, s, m, t, t_alpha=0.01, t_for_logits=None):
    """Returns (loss, new t). The target cosine's EMA ``t`` is updated first and used by the
    hard non-targets (``c_j > cos(θ_y + m)``: ``c_j (t + c_j)``); ``t_for_logits`` freezes it
    (it carries no gradient) for finite differences."""
    c = _cos(x, W)
    rows = np.arange(len(y))
    ct = c[rows, y]
    new_t = t_alpha * ct.mean() + (1 - t_alpha) * t
    used_t = new_t if t_for_logits is None else t_for_logits
    cos_theta_m = np.cos(np.arccos(ct) + m)
    target = np.where(ct > np.cos(np.pi - m), cos_theta_m, ct - m * np.sin(m))
    out = np.where(c > cos_theta_m[:, None], c * (used_t + c), c)
    out[rows, y] = target
    return _ce(s * out, y, None), new_t


def _ce(logits, y, floor):
    rows = _ce_rows(logits, y)
    if floor is not None:
        rows = np.minimum(rows, -np.log(floor))
    return rows.mean()


def insightface_grads(x, W, y, s, target_fn):
    """Closed-form gradients of arcface_torch's loss: ∂logit/∂c = s everywhere, CE cap ignored."""
    c = _cos(x, W)
    logits = s * _with_target(c, y, target_fn(c[np.arange(len(y)), y]))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    dc = s * p / len(y)
    nx = np.linalg.norm(x, axis=1, keepdims=True)
    nw = np.linalg.norm(W, axis=1, keepdims=True)
    xn, wn = x / nx, W / nw
    dxn, dwn = dc @ wn, dc.T @ xn
    dx = (dxn - (dxn * xn).sum(1, keepdims=True) * xn) / nx
    dw = (dwn - (dwn * wn).sum(1, keepdims=True) * wn) / nw
    return dx, dw


def finite_difference(f, *arrays, index, eps=1e-4):
    """Fourth-order central differences of scalar ``f(*arrays)`` w.r.t. ``arrays[index]``.

    The step is relative to each row's scale (tiny embeddings get a proportionally tiny step);
    the fourth-order stencil allows a step large enough to keep rounding error near 1e-10.
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    target = arrays[index]
    grad = np.zeros_like(target)
    row_scale = np.minimum(np.abs(target).max(axis=-1), 1.0)
    for i in np.ndindex(target.shape):
        step = eps * row_scale[i[:-1]]
        orig = target[i]
        values = []
        for k in (2, 1, -1, -2):
            target[i] = orig + k * step
            values.append(f(*arrays))
        target[i] = orig
        grad[i] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * step)
    return grad
