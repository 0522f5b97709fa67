"""Procedural synthetic face identities: the default data set of the demo and the tests.

No face data set can be downloaded here, so the demo trains on faces drawn from parameters.
Each identity is a vector of ~40 numbers (head shape, skin / hair / iris / lip colours, hair line,
eye spacing and size, brows, nose, mouth, an identity-specific skin texture, a mark, optional beard
and glasses). Each image of an identity adds nuisance (roll, scale, shift, yaw-like parallax of the
inner features, illumination level / direction / tint, background, expression: smile, open mouth,
blink, raised brows) and then a controlled degradation whose strength is the recorded *quality
level* (``NUM_QUALITY_LEVELS - 1`` = clean, 0 = worst: strong blur, heavy noise, very low
resolution and large occluders that destroy part of the identity signal).

Rendering is written with jax.numpy and compiled once: every layer is a soft mask evaluated on the
112x112 pixel grid after the inverse pose transform, and XLA fuses the ~30 layers into one pass.
That is ~0.3 ms per image, so the default demo set (27k images with the held-out sets) is ready
in about 25-35 s on the shared 2-core machine, most of it degradation and JPEG encoding.
Degradations and JPEG encoding use Pillow and NumPy per image.

Also written for held-out identities (never in the training split): a verification ``.bin`` with
genuine / impostor pairs in the insightface format, and a quality set (``.npz``) with images,
identity labels and quality levels, so that a trainer can measure the Spearman correlation between
feature norm and quality (MagFace's claim).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFilter

from magjax.data import FACE_SIZE
from magjax.data import images as image_io

NUM_QUALITY_LEVELS = 5
CLEAN = NUM_QUALITY_LEVELS - 1

# Degradation kinds, recorded as a bit mask per image.
BLUR, NOISE, LOWRES, OCCLUSION = 1, 2, 4, 8

# Small chunks: bigger ones make XLA's buffers cross malloc's mmap threshold, and the page
# faults of re-mapping them cost more than the rendering (measured: 3x slower at 128).
_RENDER_BATCH = 32


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic identity generator (all recorded in the dataset metadata).

    quality_mix[q] is the probability of quality level q (0 = worst, 4 = clean) for training
    images; verification_quality_mix the same for the images of the verification pairs.
    nuisance scales every pose / illumination / expression spread (0 = none, 1 = default).
    """

    num_identities: int = 1000
    images_per_identity: int = 20
    num_heldout: int = 200
    num_pairs: int = 3000
    quality_images_per_level: int = 1
    nuisance: float = 1.0
    quality_mix: tuple[float, ...] = (0.1, 0.1, 0.15, 0.2, 0.45)
    verification_quality_mix: tuple[float, ...] = (0.0, 0.0, 0.1, 0.2, 0.7)
    jpeg_quality: int = 95
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("quality_mix", "verification_quality_mix"):
            mix = tuple(float(p) for p in getattr(self, name))
            if len(mix) != NUM_QUALITY_LEVELS or min(mix) < 0 or not math.isclose(sum(mix), 1.0):
                raise ValueError(
                    f"SyntheticConfig.{name} must be {NUM_QUALITY_LEVELS} non-negative "
                    f"probabilities summing to 1 (quality 0 = worst .. {CLEAN} = clean), got {mix}"
                )
            object.__setattr__(self, name, mix)
        if self.num_identities < 2 or self.num_heldout < 2:
            raise ValueError("SyntheticConfig needs at least 2 training and 2 held-out identities")
        if self.images_per_identity < 1 or self.num_pairs < 2 or self.nuisance < 0:
            raise ValueError(f"invalid SyntheticConfig {self}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}


# ----------------------------------------------------------------------------- parameters


def sample_identities(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draws n identity parameter vectors (float32 arrays with leading dimension n).

    Spreads are wide on purpose: the identity signal must dominate the nuisance so that a
    small CNN can learn an identity metric that transfers to unseen identities.
    """
    u = lambda lo, hi, *shape: rng.uniform(lo, hi, (n, *shape)).astype(np.float32)
    return {
        "head_a": u(0.62, 0.86),  # half width of the head ellipse (image half-width = 1)
        "head_b": u(0.9, 1.15),  # half height
        "skin": u(0.25, 0.95, 3),
        "hair": u(0.02, 0.9, 3),
        "hairline": u(-0.8, -0.35),  # vertical position of the hair line
        "hair_curve": u(-0.5, 0.6),  # curvature of the hair line
        "hair_side": u(0.0, 0.2),  # how far side hair comes into the face
        "eye_dx": u(0.22, 0.38),  # half distance between eyes
        "eye_y": u(-0.22, 0.0),
        "eye_rx": u(0.08, 0.14),
        "eye_ry": u(0.035, 0.065),
        "iris": u(0.0, 0.8, 3),
        "brow_gap": u(0.07, 0.16),
        "brow_thick": u(0.018, 0.05),
        "brow_tilt": u(-0.35, 0.35),
        "nose_len": u(0.14, 0.34),
        "nose_w": u(0.05, 0.14),
        "mouth_y": u(0.45, 0.7),
        "mouth_w": u(0.14, 0.3),
        "lip": u(0.03, 0.07),
        "lip_rgb": u(0.2, 0.9, 3),
        "tex_freq": u(3.0, 10.0),
        "tex_angle": u(0.0, np.pi),
        "tex_amp": u(0.04, 0.2),
        "mark_xy": u(-0.45, 0.45, 2),
        "mark_r": u(0.05, 0.14),
        "mark_rgb": u(0.0, 1.0, 3),
        "mark_on": (rng.random((n,)) < 0.5).astype(np.float32),
        "beard_on": (rng.random((n,)) < 0.3).astype(np.float32),
        "glasses_on": (rng.random((n,)) < 0.25).astype(np.float32),
        "glasses_rgb": u(0.0, 0.5, 3),
    }


def sample_nuisance(rng: np.random.Generator, n: int, strength: float) -> dict[str, np.ndarray]:
    """Draws n per-image nuisance vectors; ``strength`` scales every spread."""
    s = float(strength)
    g = lambda sd, *shape: (rng.normal(0.0, sd * s, (n, *shape))).astype(np.float32)
    u01 = lambda *shape: rng.uniform(0.0, 1.0, (n, *shape)).astype(np.float32)
    return {
        "roll": np.clip(g(np.deg2rad(7.0)), -0.35, 0.35),
        "scale": np.exp(np.clip(g(0.06), -0.15, 0.15)),
        "shift": np.clip(g(0.05, 2), -0.12, 0.12),
        "yaw": np.clip(g(0.18), -0.4, 0.4),
        "gain": np.exp(np.clip(g(0.18), -0.45, 0.45)),
        "light": np.clip(g(0.25, 2), -0.6, 0.6),
        "tint": 1.0 + np.clip(g(0.05, 3), -0.12, 0.12),
        "background": u01(3),
        "bg_grad": g(0.3, 2),
        "smile": np.clip(g(0.6), -1.0, 1.5),
        "mouth_open": np.clip(u01() * s, 0.0, 1.0) ** 2,
        "eye_open": 1.0 - np.clip(u01() * 0.6 * s, 0.0, 0.9) ** 2,
        "brow_raise": np.clip(g(0.025), -0.05, 0.06),
        "gaze": np.clip(g(0.3, 2), -0.5, 0.5),
    }


# ----------------------------------------------------------------------------- rendering


def _render_one(p: dict, z: dict):
    """Renders one float RGB image in [0, 1] from identity p and nuisance z (jax arrays)."""
    import jax.numpy as jnp

    size = FACE_SIZE
    px = 1.0 / (size / 2)  # one pixel in canonical units
    c = (jnp.arange(size, dtype=jnp.float32) + 0.5) * px - 1.0
    y, x = jnp.meshgrid(c, c, indexing="ij")

    # Inverse pose: image coordinates -> face coordinates (roll, scale, shift).
    cos, sin = jnp.cos(z["roll"]), jnp.sin(z["roll"])
    xs, ys = (x - z["shift"][0]) / z["scale"], (y - z["shift"][1]) / z["scale"]
    u, v = cos * xs + sin * ys, -sin * xs + cos * ys
    # Yaw-like parallax: the inner features move further than the head outline.
    head_u = u - 0.12 * z["yaw"]
    feat_u = u - 0.35 * z["yaw"]

    def soft(d):  # signed distance (canonical units, < 0 inside) -> coverage with 1px edge
        return jnp.clip(0.5 - d / px, 0.0, 1.0)

    def ellipse(uu, vv, cx, cy, a, b):
        r = jnp.sqrt(((uu - cx) / a) ** 2 + ((vv - cy) / b) ** 2 + 1e-12)
        return soft((r - 1.0) * jnp.minimum(a, b))

    def over(img, mask, rgb):
        m = mask[..., None]
        return img * (1.0 - m) + m * rgb

    bg = z["background"] * (1.0 + z["bg_grad"][0] * x[..., None] + z["bg_grad"][1] * y[..., None])
    img = jnp.clip(bg, 0.0, 1.0)

    # Hair mass behind the head.
    hair_back = ellipse(head_u, v, 0.0, 0.05, p["head_a"] + 0.08, p["head_b"] + 0.02)
    hair_back = hair_back * (v < 0.25 + 0.4 * p["hair_side"])
    img = over(img, hair_back, p["hair"])

    # Head with an identity-specific skin texture (stripes at an identity angle and frequency).
    head = ellipse(head_u, v, 0.0, 0.1, p["head_a"], p["head_b"])
    ang = p["tex_angle"]
    tex = jnp.sin(p["tex_freq"] * jnp.pi * (jnp.cos(ang) * feat_u + jnp.sin(ang) * v))
    skin = p["skin"] * (1.0 + p["tex_amp"] * tex)[..., None]
    m = head[..., None]
    img = img * (1.0 - m) + m * skin

    # Identity mark (birthmark / tattoo).
    mark = ellipse(feat_u, v, p["mark_xy"][0], p["mark_xy"][1] + 0.2, p["mark_r"], p["mark_r"])
    img = over(img, mark * head * p["mark_on"], p["mark_rgb"])

    # Hair line (curved) and side hair, inside the head.
    line = p["hairline"] + p["hair_curve"] * head_u**2
    side = jnp.abs(head_u) > p["head_a"] - p["hair_side"]
    hair_front = head * jnp.maximum(soft(v - line), side * (v < 0.1))
    img = over(img, hair_front, p["hair"])

    # Beard: lower face, half transparent.
    beard = head * soft(p["mouth_y"] - 0.08 - v) * p["beard_on"] * 0.75
    img = over(img, beard, p["hair"] * 0.8)

    for sx in (-1.0, 1.0):
        ex = sx * p["eye_dx"]
        # Brows: tilted bars above the eyes, raised by expression.
        by = p["eye_y"] - p["brow_gap"] - z["brow_raise"]
        tilt = sx * p["brow_tilt"] * (feat_u - ex)
        brow = ellipse(feat_u, v - tilt, ex, by, p["eye_rx"] * 1.3, p["brow_thick"])
        img = over(img, brow, p["hair"] * 0.7)
        # Eye: white, iris, pupil; the lids close with the expression's blink.
        ry = p["eye_ry"] * z["eye_open"]
        white = ellipse(feat_u, v, ex, p["eye_y"], p["eye_rx"], ry)
        img = over(img, white, jnp.array([0.95, 0.95, 0.92]))
        ix = ex + z["gaze"][0] * p["eye_rx"] * 0.4
        iris = ellipse(feat_u, v, ix, p["eye_y"], p["eye_ry"] * 0.95, p["eye_ry"] * 0.95) * white
        img = over(img, iris, p["iris"])
        pupil = ellipse(feat_u, v, ix, p["eye_y"], p["eye_ry"] * 0.4, p["eye_ry"] * 0.4) * white
        img = over(img, pupil, jnp.zeros(3))
        # Glasses: a dark ring around each eye.
        rr = jnp.sqrt((feat_u - ex) ** 2 + (v - p["eye_y"]) ** 2)
        ring = soft(jnp.abs(rr - (p["eye_rx"] + 0.06)) - 0.012) * p["glasses_on"]
        img = over(img, ring, p["glasses_rgb"])

    # Nose: a shaded wedge below the eyes, its tip further off-centre with yaw.
    ny0 = p["eye_y"] + 0.05
    t = jnp.clip((v - ny0) / p["nose_len"], 0.0, 1.0)
    nose_u = feat_u - 0.1 * z["yaw"] * t
    nose = soft(jnp.abs(nose_u) - p["nose_w"] * t) * (v > ny0) * (v < ny0 + p["nose_len"])
    img = over(img, nose * 0.55, p["skin"] * 0.55)

    # Mouth: two lips whose centre line bends with the smile and opens with the expression.
    mw = p["mouth_w"] * (1.0 + 0.1 * z["smile"])
    du = feat_u / mw
    centre = p["mouth_y"] - 0.05 * z["smile"] * (du**2 - 0.3)
    gap = 0.06 * z["mouth_open"]
    inside = soft(jnp.abs(du) - 1.0)
    upper = inside * soft(jnp.abs(v - (centre - gap / 2 - p["lip"] / 2)) - p["lip"] / 2)
    lower = inside * soft(jnp.abs(v - (centre + gap / 2 + p["lip"] / 2)) - p["lip"] / 2)
    opening = inside * soft(jnp.abs(v - centre) - gap / 2)
    img = over(img, opening, jnp.array([0.15, 0.05, 0.05]))
    img = over(img, jnp.maximum(upper, lower), p["lip_rgb"])

    # Illumination: level, direction (linear ramp over the image) and colour tint.
    shade = z["gain"] * (1.0 + z["light"][0] * x + z["light"][1] * y)
    img = img * shade[..., None] * z["tint"]
    return jnp.clip(img, 0.0, 1.0)


@functools.cache
def _compiled_renderer():
    import jax
    import jax.numpy as jnp

    def render_batch(p, z):
        img = jax.vmap(_render_one)(p, z)
        return jnp.round(img * 255.0).astype(jnp.uint8)

    return jax.jit(render_batch)


def render(identity: dict[str, np.ndarray], nuisance: dict[str, np.ndarray]) -> np.ndarray:
    """Renders clean uint8 RGB images [n, 112, 112, 3] (one per row of the parameter dicts).

    Runs on the host CPU in fixed-size padded chunks, so the function compiles once.
    """
    import jax

    n = len(next(iter(nuisance.values())))
    out = np.empty((n, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    fn = _compiled_renderer()
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        for start in range(0, n, _RENDER_BATCH):
            stop = min(n, start + _RENDER_BATCH)
            p = {k: _padded(a, start, stop) for k, a in identity.items()}
            z = {k: _padded(a, start, stop) for k, a in nuisance.items()}
            out[start:stop] = np.asarray(fn(p, z))[: stop - start]
    return out


def _padded(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of a, the last row repeated up to _RENDER_BATCH rows."""
    fill = np.repeat(a[stop - 1 : stop], _RENDER_BATCH - (stop - start), axis=0)
    return np.concatenate([a[start:stop], fill])


# ----------------------------------------------------------------------------- degradation


def degrade(image: np.ndarray, quality: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Applies a degradation of the given quality level (CLEAN = none) to a uint8 RGB image.

    severity = 1 - quality / CLEAN. Severity <= 0.5 applies one kind, above that two kinds, drawn
    from blur (sigma up to 3.5 px), Gaussian noise (std up to 60 grey levels), low resolution
    (down to 13 px per side, bilinear back up) and an occluding rectangle (up to 45 % of the
    area). Returns the degraded image and the bit mask of applied kinds.
    """
    if not 0 <= quality <= CLEAN:
        raise ValueError(f"quality level must be in [0, {CLEAN}], got {quality}")
    sev = 1.0 - quality / CLEAN
    if sev == 0.0:
        return image, 0
    kinds = rng.choice(4, size=1 if sev <= 0.5 else 2, replace=False)
    flags = 0
    pil = Image.fromarray(image)
    for kind in sorted(kinds):
        if kind == 0:
            pil = pil.filter(ImageFilter.GaussianBlur(radius=3.5 * sev * rng.uniform(0.8, 1.0)))
            flags |= BLUR
        elif kind == 1:
            arr = np.asarray(pil, np.float32)
            arr = arr + rng.normal(0.0, 60.0 * sev, arr.shape).astype(np.float32)
            pil = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
            flags |= NOISE
        elif kind == 2:
            side = max(8, round(FACE_SIZE * (1.0 - 0.88 * sev * rng.uniform(0.9, 1.0))))
            pil = pil.resize((side, side), Image.BILINEAR, reducing_gap=None)
            pil = pil.resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR)
            flags |= LOWRES
        else:
            arr = np.array(pil)
            area = 0.45 * sev * rng.uniform(0.8, 1.0) * FACE_SIZE**2
            h = int(np.clip(math.sqrt(area) * rng.uniform(0.6, 1.6), 8, FACE_SIZE))
            w = int(np.clip(area / h, 8, FACE_SIZE))
            top = rng.integers(0, FACE_SIZE - h + 1)
            left = rng.integers(0, FACE_SIZE - w + 1)
            arr[top : top + h, left : left + w] = rng.integers(0, 256, 3, dtype=np.uint8)
            pil = Image.fromarray(arr)
            flags |= OCCLUSION
    return np.asarray(pil), flags


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG-encodes a uint8 RGB image with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _take(params: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: a[rows] for k, a in params.items()}


def generate(
    identity: dict[str, np.ndarray],
    labels: np.ndarray,
    qualities: np.ndarray,
    rng: np.random.Generator,
    cfg: SyntheticConfig,
) -> Iterator[tuple[np.ndarray, int]]:
    """Yields (degraded uint8 image, degradation flags) for each (label, quality) row, in order.

    ``labels`` index rows of ``identity``; chunks keep memory bounded for big sets.
    """
    chunk = 1024
    for start in range(0, len(labels), chunk):
        rows = labels[start : start + chunk]
        nuisance = sample_nuisance(rng, len(rows), cfg.nuisance)
        images = render(_take(identity, rows), nuisance)
        for img, q in zip(images, qualities[start : start + chunk], strict=True):
            yield degrade(img, int(q), rng)


class SyntheticFaces:
    """The parameters of one synthetic data set: training and held-out identities.

    Everything is a deterministic function of ``cfg`` (seed included): identities come from
    ``seed``'s stream 0, the training images from stream 1, the held-out sets from streams 2-3.
    """

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        ids = sample_identities(np.random.default_rng([cfg.seed, 0]), cfg.num_identities)
        held = sample_identities(np.random.default_rng([cfg.seed, 100]), cfg.num_heldout)
        self.train_identities, self.heldout_identities = ids, held

    def train_examples(self) -> Iterator[tuple[int, bytes, int, int, int]]:
        """Yields (key, jpeg bytes, label, quality, degradation flags) for the training split."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1])
        labels = np.repeat(np.arange(cfg.num_identities), cfg.images_per_identity)
        qualities = rng.choice(NUM_QUALITY_LEVELS, size=len(labels), p=cfg.quality_mix)
        stream = generate(self.train_identities, labels, qualities, rng, cfg)
        for key, ((img, flags), label, q) in enumerate(zip(stream, labels, qualities, strict=True)):
            yield key, encode_jpeg(img, cfg.jpeg_quality), int(label), int(q), flags

    def verification_pairs(self) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]:
        """Builds the held-out verification pairs.

        Returns (2P JPEG byte strings, issame bool [P], identity of each image [2P], quality of
        each image [2P]). Half the pairs are genuine (two independent images of one held-out
        identity), half impostor (two different held-out identities), in random order so that
        every one of the 10 contiguous folds holds both kinds.
        """
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2])
        p = cfg.num_pairs
        issame = np.zeros(p, bool)
        issame[rng.permutation(p)[: p // 2]] = True
        first = rng.integers(0, cfg.num_heldout, p)
        other = (first + rng.integers(1, cfg.num_heldout, p)) % cfg.num_heldout
        second = np.where(issame, first, other)
        labels = np.stack([first, second], 1).reshape(-1)
        qualities = rng.choice(NUM_QUALITY_LEVELS, size=2 * p, p=cfg.verification_quality_mix)
        stream = generate(self.heldout_identities, labels, qualities, rng, cfg)
        jpegs = [encode_jpeg(img, cfg.jpeg_quality) for img, _ in stream]
        return jpegs, issame, labels, qualities

    def quality_set(self) -> dict[str, np.ndarray]:
        """Held-out images at every quality level, decoded from their JPEG like training images.

        Keys: images uint8 [N,112,112,3], labels int32 [N] (held-out identity), quality int32
        [N] (0 worst .. 4 clean), degradation int32 [N] (bit mask BLUR|NOISE|LOWRES|OCCLUSION).
        """
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 3])
        per = cfg.quality_images_per_level
        labels = np.repeat(np.arange(cfg.num_heldout), NUM_QUALITY_LEVELS * per)
        qualities = np.tile(np.repeat(np.arange(NUM_QUALITY_LEVELS), per), cfg.num_heldout)
        images, flags = [], []
        for img, f in generate(self.heldout_identities, labels, qualities, rng, cfg):
            jpeg = encode_jpeg(img, cfg.jpeg_quality)
            images.append(np.asarray(image_io.to_rgb(Image.open(io.BytesIO(jpeg)))))
            flags.append(f)
        return {
            "images": np.stack(images),
            "labels": labels.astype(np.int32),
            "quality": qualities.astype(np.int32),
            "degradation": np.asarray(flags, np.int32),
        }
