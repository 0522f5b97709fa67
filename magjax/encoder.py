"""``FaceEncoder``: embeddings and quality scores from an exported magjax model.

    encoder = FaceEncoder.load("runs/demo")          # training workdir (uses runs/demo/model)
    encoder = FaceEncoder.load("converted/r100")     # output of python -m magjax.convert
    embeddings, quality = encoder.encode(faces)      # faces: uint8 RGB [N, 112, 112, 3]

The model's own input convention (RGB/BGR order, value range; ``model.json["input_spec"]``) is
applied inside the jitted forward pass, so callers always pass plain RGB uint8 images, whichever
family (arcface_torch, MagFace, AdaFace) the weights come from. Faces must already be aligned to
the ArcFace 112x112 template (``magjax.eval.align.align_face`` does it from five landmarks);
``encode_photos`` takes whole photos instead, and detects and aligns their faces itself.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magjax import checkpoint, models
from magjax.checkpoint import MODEL_META


def resolve_model_dir(path: str | pathlib.Path) -> pathlib.Path:
    """``path`` itself if it holds ``model.json``, else ``path/model`` (a training workdir).
    Either may be a model whose replacement a kill interrupted (``checkpoint.readable_model_dir``
    finds it beside)."""
    path = pathlib.Path(path)
    for candidate in (path, path / "model"):
        if checkpoint.readable_model_dir(candidate) is not None:
            return candidate
    raise FileNotFoundError(
        f"no {MODEL_META} in {path} or {path / 'model'}: expected an inference model directory "
        "(python -m magjax.convert output) or a training workdir holding one in model/"
    )


def _embedding_dim(arch: str, variables: Any, meta: dict) -> int:
    """``meta["embedding_dim"]`` if present, else read off the variables' shapes.

    The backbone built with the default 512 is compared leaf by leaf with the loaded variables:
    where a dimension 512 differs, the loaded size is the embedding dimension.
    """
    if "embedding_dim" in meta:
        return int(meta["embedding_dim"])
    default = 512
    abstract = models.abstract_variables(arch, embedding_dim=default)
    flat_abstract = jax.tree_util.tree_flatten_with_path(abstract)[0]
    loaded = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    for key, leaf in flat_abstract:
        got = loaded.get(jax.tree_util.keystr(key))
        if got is None or tuple(got.shape) == tuple(leaf.shape):
            continue
        for want, have in zip(leaf.shape, got.shape, strict=False):
            if want == default and have != default:
                return int(have)
    return default


class FaceEncoder:
    """A backbone plus its input convention; ``encode`` maps RGB uint8 faces to embeddings.

    ``variables`` (``{"params", "batch_stats"}``) is a plain attribute passed to the jitted
    forward function as an argument: the training loop builds one encoder with placeholder
    variables and assigns its current ones before each evaluation, without recompiling.
    """

    def __init__(
        self,
        arch: str,
        variables: Any,
        input_spec: dict,
        *,
        embedding_dim: int = 512,
        batch_size: int = 64,
        dtype: Any = jnp.float32,
        meta: dict | None = None,
    ):
        self.arch = arch
        self.input_spec = dict(input_spec)
        self.batch_size = int(batch_size)
        self.embedding_dim = int(embedding_dim)
        self.meta = dict(meta or {"arch": arch, "input_spec": input_spec})
        self.module = models.build(arch, dtype=dtype, embedding_dim=embedding_dim)
        self.variables = jax.device_put(variables)
        spec = self.input_spec
        module = self.module

        def forward(variables, images_uint8):
            x = models.preprocess(images_uint8, spec)
            return module.apply(variables, x, train=False).astype(jnp.float32)

        self._forward = jax.jit(forward)

    @classmethod
    def load(
        cls, path: str | pathlib.Path, *, batch_size: int = 64, dtype: Any = jnp.float32
    ) -> FaceEncoder:
        """Loads an inference-model directory or a training workdir (its ``model/``)."""
        directory = resolve_model_dir(path)
        variables, meta = checkpoint.load_inference_model(directory)
        arch = meta["arch"]
        spec = meta.get("input_spec") or models.input_spec(arch)
        return cls(
            arch,
            variables,
            spec,
            embedding_dim=_embedding_dim(arch, variables, meta),
            batch_size=batch_size,
            dtype=dtype,
            meta=meta,
        )

    def embed_raw(self, images_uint8_rgb: np.ndarray) -> np.ndarray:
        """Raw (un-normalised) float32 embeddings [N, d] of uint8 RGB faces [N, 112, 112, 3].

        Runs in fixed-size batches (the last one padded) so that one compilation serves all.
        """
        images = np.asarray(images_uint8_rgb)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != models.INPUT_SHAPE:
            raise ValueError(
                f"expected aligned RGB faces [N, 112, 112, 3], got shape {images.shape} "
                "(resize or align them first, e.g. magjax.eval.align.align_face)"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got dtype {images.dtype}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size]
            count = batch.shape[0]
            if count < self.batch_size:
                pad = np.zeros((self.batch_size - count, *batch.shape[1:]), np.uint8)
                batch = np.concatenate([batch, pad])
            out.append(np.asarray(self._forward(self.variables, batch))[:count])
        if not out:
            return np.zeros((0, self.embedding_dim), np.float32)
        return np.concatenate(out)

    def encode(self, images_uint8_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings [N, d] L2-normalised float32, quality [N])`` of RGB uint8 faces.

        ``quality`` is the norm of the raw embedding: MagFace's magnitude, AdaFace's feature norm
        (meaningful as a quality score for models trained with those losses).
        """
        raw = self.embed_raw(images_uint8_rgb)
        norms = np.linalg.norm(raw, axis=1)
        embeddings = raw / np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
        return embeddings.astype(np.float32), norms.astype(np.float32)

    def encode_photos(
        self, photos, detector=None, *, one_face: bool = False
    ) -> dict[str, np.ndarray]:
        """Detects, aligns and encodes every face of unaligned photos.

        ``photos``: RGB uint8 pictures [H, W, 3] of any sizes (a list, or one array [H, W, 3]),
        upright (read files with ``magjax.detect.read_photo``, which applies EXIF orientation).
        ``detector``: a ``magjax.detect.FaceDetector`` (default: YuNet with its default minimum
        score and face size); ``one_face`` keeps only each photo's
        ``primary_face``. Returns one row per face, in photo order: ``embeddings`` [N, d],
        ``quality`` [N], ``boxes`` [N, 4] (x1, y1, x2, y2), ``landmarks`` [N, 5, 2] (x, y),
        ``scores`` [N] and ``image_index`` [N] (the photo each face is in), plus ``no_face``:
        the indices of the photos in which no face was found.
        """
        from magjax import detect

        if isinstance(photos, np.ndarray) and photos.ndim == 3:
            photos = [photos]
        detector = detector if detector is not None else detect.FaceDetector()
        found, crops, index, no_face = [], [], [], []
        for i, photo in enumerate(photos):
            faces, aligned = detector.faces_and_crops(photo, one_face)
            if not len(faces):
                no_face.append(i)
            found.append(faces)
            crops.append(aligned)
            index.extend([i] * len(faces))
        if crops:
            embeddings, quality = self.encode(np.concatenate(crops))
        else:
            embeddings, quality = self.encode(np.zeros((0, *models.INPUT_SHAPE), np.uint8))
        faces = found or [detect.Faces.empty()]
        return {
            "embeddings": embeddings,
            "quality": quality,
            "boxes": np.concatenate([f.boxes for f in faces]),
            "landmarks": np.concatenate([f.landmarks for f in faces]),
            "scores": np.concatenate([f.scores for f in faces]),
            "image_index": np.asarray(index, np.int64),
            "no_face": np.asarray(no_face, np.int64),
        }
