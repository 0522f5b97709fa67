"""TFDS builders that turn face data sets into array_record TFDS datasets, and ``prepare``.

Three sources: an insightface RecordIO directory, an image folder (one sub-folder per identity,
including WebFace42M's split into top-level parts ``0..9``) and the procedural synthetic
identities. All write ``array_record`` files with JPEG bytes (no TensorFlow needed, see
docs/jax-stack.md section 4) and the features ``image`` (encoded bytes, 112x112x3),
``label`` (ClassLabel) and ``source_id`` (record key / file number in the source, for logs);
the synthetic set adds ``quality`` (0 worst .. 4 clean) and ``degradation`` (bit mask).

Every image is decoded once at prepare time: an unreadable one (corrupt, truncated, a JPEG with
corrupt scan data, or a decompression bomb; the policy of ``magjax.data.images``) is skipped,
counted and logged with its source record (``skipped`` in the metadata, which ``inspect``
prints); an image that is not 112x112 is resized and re-encoded with a one-time warning, or is an
error when ``on_size_mismatch="error"``.

A prepared dataset root holds ``<builder>/<version>/`` (the TFDS files), ``magjax_dataset.json``
(written last: its presence marks a complete dataset) and, for synthetic sets, the held-out
``verification.bin`` and ``quality.npz``.
"""

from __future__ import annotations

import fcntl
import inspect
import io
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from magjax.data import FACE_SIZE, images, recordio, synthetic, verification_bin
from magjax.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "magjax_dataset.json"
_MAX_LOGGED_SKIPS = 100


class _FaceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: validation, skipping and metadata; subclasses provide the records."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First magjax release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves this through `importlib_resources`, which it does not install;
        # without this override preparing a builder defined in a package fails on import.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, data_dir: str, on_size_mismatch: str = "resize", **kwargs):
        if on_size_mismatch not in ("resize", "error"):
            raise ValueError(
                f"on_size_mismatch must be 'resize' or 'error', not {on_size_mismatch!r}"
            )
        self.on_size_mismatch = on_size_mismatch
        self.skipped: list[int] = []
        self.resized = 0
        super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)

    # Subclasses: number of classes, extra features / metadata, and the record stream.
    num_classes: int
    validate = True  # decode every image at prepare time (off for images encoded here)

    def _extra_features(self) -> dict:
        return {}

    def _extra_metadata(self) -> dict:
        return {}

    def _records(self) -> Iterator[tuple[int, int, bytes, dict]]:
        """Yields (source_id, label, encoded image, extra features)."""
        raise NotImplementedError

    def _source_name(self, source_id: int) -> str:
        return f"record {source_id}"

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(
                shape=(FACE_SIZE, FACE_SIZE, 3), encoding_format="jpeg"
            ),
            "label": tfds.features.ClassLabel(num_classes=self.num_classes),
            "source_id": tfds.features.Scalar(dtype=np.int64),
            **self._extra_features(),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(
                image_size=FACE_SIZE, on_size_mismatch=self.on_size_mismatch,
                **self._extra_metadata()
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _checked_image(self, source_id: int, data: bytes) -> bytes | None:
        """Decodes once to validate; returns the bytes to store or None to skip."""
        if not self.validate:
            return data
        try:
            im = images.open_image(data, self._source_name(source_id))
        except images.UnreadableImageError as e:
            self._skip(source_id, e)
            return None
        size = im.size
        if size == (FACE_SIZE, FACE_SIZE):
            return data
        if self.on_size_mismatch == "error":
            raise ValueError(
                f"{self._source_name(source_id)} is {size[0]}x{size[1]}, expected "
                f"{FACE_SIZE}x{FACE_SIZE} (aligned faces); use on_size_mismatch='resize' "
                "to resize"
            )
        if self.resized == 0:
            log.warning(
                "%s is %dx%d: resizing to %d (warned once; counted as 'resized')",
                self._source_name(source_id), *size, FACE_SIZE,
            )
        self.resized += 1
        im = im.convert("RGB").resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    def _skip(self, source_id: int, reason: Exception) -> None:
        """Counts an unreadable record (and logs the first ones)."""
        if len(self.skipped) < _MAX_LOGGED_SKIPS:
            log.warning("skipping %s", reason)
        self.skipped.append(source_id)

    def _generate_examples(self):
        key = 0
        for source_id, label, data, extra in self._records():
            image = self._checked_image(source_id, data)
            if image is None:
                continue
            yield key, {"image": image, "label": label, "source_id": source_id, **extra}
            key += 1
        if key == 0:
            source = self._extra_metadata().get("source", type(self).__name__)
            raise UserError(f"{source}: no readable image ({len(self.skipped)} skipped, see the "
                            "log)")
        # Written into metadata.json when the split is finalised.
        self.info.metadata["skipped"] = len(self.skipped)
        self.info.metadata["skipped_source_ids"] = self.skipped[:_MAX_LOGGED_SKIPS]
        self.info.metadata["resized"] = self.resized
        if self.skipped:
            log.warning("skipped %d unreadable images in total", len(self.skipped))


class FaceRec(_FaceBuilder, skip_registration=True):
    """Face images and identity labels from an insightface RecordIO directory."""

    def __init__(self, *, src: str | os.PathLike, **kwargs):
        self.rec = recordio.FaceRecord(src)
        self.num_classes = self.rec.num_classes
        super().__init__(**kwargs)

    def _extra_metadata(self) -> dict:
        return {"source": str(self.rec.dir), "has_header": self.rec.has_header}

    def _source_name(self, source_id: int) -> str:
        return f"{self.rec.reader.rec_path} record {source_id}"

    def _records(self):
        # A damaged record (a .rec cut short inside its last record, say) is skipped and
        # counted like an undecodable image; the labels read check the property's class count.
        labels, damaged = set(), 0
        for key in self.rec.image_keys:
            try:
                label, data = self.rec.read(key)
            except recordio.DamagedRecordError as e:
                self._skip(key, e)
                damaged += 1
                continue
            labels.add(label)
            yield key, label, data, {}
        self._check_num_classes(labels, damaged)

    def _check_num_classes(self, labels: set[int], damaged: int) -> None:
        """The property's class count must be what the labels use (labels 0 .. C-1); each
        damaged record may hide one class above the largest label read."""
        used = max(labels) + 1 if labels else 0
        if used + damaged < self.num_classes:
            raise recordio.RecordIOError(
                f"{self.rec.dir / 'property'}: says {self.num_classes} classes, but the labels "
                f"in {self.rec.reader.rec_path} use {used} (0..{used - 1}); fix num_classes on "
                "its first line"
            )
        if len(labels) < self.num_classes:
            log.warning("%d of %d classes have no readable image in %s",
                        self.num_classes - len(labels), self.num_classes,
                        self.rec.reader.rec_path)


def list_image_folder(root: str | os.PathLike, layout: str = "auto") -> tuple[list[str], list]:
    """Lists identities and images of an image folder.

    ``flat``: ``root/<identity>/<image>``; ``split``: ``root/<part>/<identity>/<image>`` with the
    identities of all parts merged (WebFace42M's ``0..9``); ``auto`` picks ``split`` when every
    top-level directory holds only directories. Labels are the positions of the identity names in
    sorted order (torchvision ImageFolder). Hidden entries (names starting with ``.``) are
    ignored; identity folders without image files are not classes (logged); a folder name with
    a line break is an error. Returns (identity names, [(path, label)]).
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    top = sorted(_subdirs(root), key=lambda e: e.name)
    if not top:
        raise UserError(f"{root}: expected one sub-directory per identity, found none")
    if layout == "auto":
        def only_dirs(d):
            entries = _visible(d.path)
            return bool(entries) and all(e.is_dir() for e in entries)

        layout = "split" if all(only_dirs(d) for d in top) else "flat"
    if layout == "flat":
        identity_dirs = {d.name: d.path for d in top}
    elif layout == "split":
        identity_dirs = {}
        for part in top:
            for d in _subdirs(part.path):
                if d.name in identity_dirs:
                    raise UserError(
                        f"identity '{d.name}' appears in {identity_dirs[d.name]} and {d.path}: "
                        "identity names must be unique across the parts of a split folder"
                    )
                identity_dirs[d.name] = d.path
    else:
        raise ValueError(f"layout must be 'auto', 'flat' or 'split', not {layout!r}")
    for name, path in identity_dirs.items():
        if "".join(name.splitlines()) != name:
            # classes.txt holds one name per line: a line break would shift every later name.
            raise UserError(f"{path!r}: an identity folder name may not contain a line break")
    images_of = {}
    for name, path in identity_dirs.items():
        images_of[name] = sorted(
            f.path for f in _visible(path)
            if f.is_file() and f.name.lower().endswith(images.IMAGE_SUFFIXES)
        )
    empty = sorted(identity_dirs[n] for n, found in images_of.items() if not found)
    if empty:
        log.warning("skipping %d identity folders without image files (not classes): %s%s",
                    len(empty), ", ".join(empty[:10]), " ..." if len(empty) > 10 else "")
    names = sorted(n for n, found in images_of.items() if found)
    files = [(path, label) for label, name in enumerate(names) for path in images_of[name]]
    if not files:
        raise UserError(f"{root}: no image files ({', '.join(images.IMAGE_SUFFIXES)}) found")
    return names, files


def _visible(path) -> list[os.DirEntry]:
    """The entries of a directory except hidden ones (``.DS_Store``, ``.git``, ``._x.jpg``)."""
    return [e for e in os.scandir(path) if not e.name.startswith(".")]


def _subdirs(path) -> list[os.DirEntry]:
    return [e for e in _visible(path) if e.is_dir()]


class FaceFolder(_FaceBuilder, skip_registration=True):
    """Face images from an image folder with one sub-folder per identity."""

    def __init__(self, *, src: str | os.PathLike, layout: str = "auto", **kwargs):
        self.src = pathlib.Path(src)
        self.class_names, self.files = list_image_folder(self.src, layout)
        self.num_classes = len(self.class_names)
        super().__init__(**kwargs)

    def _extra_metadata(self) -> dict:
        return {"source": str(self.src)}

    def _source_name(self, source_id: int) -> str:
        return f"{self.files[source_id][0]} (file {source_id})"

    def _records(self):
        for i, (path, label) in enumerate(self.files):
            yield i, label, pathlib.Path(path).read_bytes(), {}


class SyntheticFaces(_FaceBuilder, skip_registration=True):
    """Procedurally rendered synthetic face identities (see magjax.data.synthetic)."""

    validate = False

    def __init__(self, *, config: synthetic.SyntheticConfig, **kwargs):
        self.faces = synthetic.SyntheticFaces(config)
        self.num_classes = config.num_identities
        super().__init__(**kwargs)

    def _extra_features(self) -> dict:
        return {
            "quality": tfds.features.Scalar(dtype=np.int32),
            "degradation": tfds.features.Scalar(dtype=np.int32),
        }

    def _extra_metadata(self) -> dict:
        return {
            "generator": self.faces.cfg.to_json(),
            "num_quality_levels": synthetic.NUM_QUALITY_LEVELS,
            "degradation_bits": {"blur": 1, "noise": 2, "lowres": 4, "occlusion": 8},
        }

    def _records(self):
        for key, jpeg, label, quality, flags in self.faces.train_examples():
            yield key, label, jpeg, {"quality": quality, "degradation": flags}


# ----------------------------------------------------------------------------- prepare / inspect


def read_manifest(path: pathlib.Path) -> dict:
    """The JSON object of a ``magjax_dataset.json``; a damaged one is an error naming it."""
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged dataset manifest, not JSON ({e}); prepare the dataset "
                        "again into a new --out") from None
    if not isinstance(manifest, dict) or "dataset_dir" not in manifest:
        raise UserError(f"{path}: damaged dataset manifest (expected an object with "
                        "'dataset_dir'); prepare the dataset again into a new --out")
    return manifest


def find_dataset_dir(path: str | os.PathLike) -> pathlib.Path:
    """The TFDS version directory of a prepared dataset, given it or its root."""
    path = pathlib.Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    manifest = path / MANIFEST
    if manifest.is_file():
        return path / read_manifest(manifest)["dataset_dir"]
    found = sorted(path.glob("*/*/dataset_info.json"))
    if len(found) == 1:
        return found[0].parent
    raise FileNotFoundError(
        f"{path}: no prepared dataset (expected {MANIFEST} or <name>/<version>/dataset_info.json;"
        " build one with `python -m magjax.data prepare`)"
    )


def _normalise(options: dict) -> dict:
    return json.loads(json.dumps(options, sort_keys=True, default=str))


def prepare(format: str, src: str | os.PathLike | None, out: str | os.PathLike,
            **options) -> pathlib.Path:
    """Builds a TFDS dataset from ``src`` into ``out`` and returns ``out`` (the dataset root).

    format: ``rec`` (insightface RecordIO dir), ``folder`` (identity sub-folders; option
    ``layout``), or ``synthetic`` (``src`` unused; options are SyntheticConfig fields).
    Common option: ``on_size_mismatch`` ('resize' | 'error'). Idempotent: when ``out`` already
    holds a complete dataset built with the same format and options it is returned as is; one
    built differently is an error rather than a silent mix. Safe to call from several processes
    of one job at once (an exclusive lock on ``out/.prepare.lock``): one builds, the others wait
    and then find the complete dataset.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(format, src, out, **options)


def _prepare(format: str, src, out: pathlib.Path, **options) -> pathlib.Path:
    src = pathlib.Path(src).resolve() if src else None
    request = _normalise({"format": format, "src": str(src) if src else None, "options": options})
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        if manifest.get("complete") and {k: manifest.get(k) for k in request} == request:
            return out
        raise FileExistsError(
            f"{out} already holds a dataset built with {manifest.get('format')} "
            f"{manifest.get('options')} from {manifest.get('src')}; choose another --out or "
            "delete it"
        )
    size_opt = {k: options.pop(k) for k in ("on_size_mismatch",) if k in options}
    cfg = None
    if format == "rec":
        builder = FaceRec(src=_need_src(src, format), data_dir=str(out), **size_opt)
    elif format == "folder":
        layout = options.pop("layout", "auto")
        builder = FaceFolder(src=_need_src(src, format), layout=layout, data_dir=str(out),
                             **size_opt)
    elif format == "synthetic":
        cfg = synthetic.SyntheticConfig(**options)
        builder = SyntheticFaces(config=cfg, data_dir=str(out), **size_opt)
    else:
        raise ValueError(f"unknown format {format!r}: expected rec, folder or synthetic")
    if options and format != "synthetic":
        raise TypeError(f"unknown options for format {format}: {sorted(options)}")

    # A half-written earlier attempt (no manifest) is rebuilt from scratch.
    version_dir = pathlib.Path(builder.data_dir)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    start = time.time()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False)
    )
    downloads = out / "downloads"
    if downloads.is_dir() and not any(p.is_file() for p in downloads.rglob("*")):
        shutil.rmtree(downloads)  # tfds creates it; nothing is downloaded here

    extras: dict = {}
    if format == "folder":
        (out / "classes.txt").write_text("".join(n + "\n" for n in builder.class_names))
        extras["classes"] = "classes.txt"
    if cfg is not None:
        jpegs, issame, _, _ = builder.faces.verification_pairs()
        verification_bin.write_bin(out / "verification.bin", jpegs, issame)
        np.savez(out / "quality.npz", **builder.faces.quality_set())
        extras["verification_bins"] = ["verification.bin"]
        extras["quality_set"] = "quality.npz"

    info = builder.info
    manifest = {
        **request,
        "complete": True,
        "dataset_dir": str(version_dir.relative_to(out)),
        "num_examples": int(info.splits["train"].num_examples),
        "num_classes": int(builder.num_classes),
        "skipped": len(builder.skipped),
        "resized": builder.resized,
        "seconds": round(time.time() - start, 1),
        **extras,
    }
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)
    return out


def _need_src(src, format: str) -> pathlib.Path:
    if not src:
        raise ValueError(f"--src is required for format {format}")
    return pathlib.Path(src)


def inspect_dataset(path: str | os.PathLike) -> dict:
    """Summary of a prepared dataset for ``python -m magjax.data inspect DIR``."""
    version_dir = find_dataset_dir(path)
    builder = tfds.builder_from_directory(str(version_dir))
    meta = dict(builder.info.metadata or {})
    summary = {
        "path": str(path),
        "dataset_dir": str(version_dir),
        "name": builder.info.name,
        "num_examples": int(builder.info.splits["train"].num_examples),
        "num_classes": int(builder.info.features["label"].num_classes),
        "skipped": int(meta.get("skipped", 0)),
        "resized": int(meta.get("resized", 0)),
        "features": sorted(builder.info.features.keys()),
        "metadata": meta,
    }
    manifest = pathlib.Path(path) / MANIFEST
    if manifest.is_file():
        m = read_manifest(manifest)
        summary.update({k: m[k] for k in ("format", "src", "options", "verification_bins",
                                          "quality_set", "classes") if k in m})
    return summary
