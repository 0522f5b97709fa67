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
error when ``on_size_mismatch="error"``. A class left without any readable image keeps its label
(the others must not shift) and is named in a warning, for every source alike
(``classes_without_images`` in the metadata). Folder builds write ``classes.txt`` (label order,
the folder names' bytes as the file system holds them) before the build, so that nothing that
can fail comes after it; an entry that cannot be followed (a symbolic link loop) is refused in
one line before anything is built.

A prepared dataset root holds ``<builder>/<version>/`` (the TFDS files), ``magjax_dataset.json``
(written last: its presence marks a complete dataset) and, for synthetic sets, the held-out
``verification.bin`` and ``quality.npz``; :mod:`magjax.data.prepared` reads that layout.
"""

from __future__ import annotations

import contextlib
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

from magjax import files
from magjax.data import FACE_SIZE, images, recordio, synthetic, verification_bin
from magjax.data.prepared import MANIFEST, find_dataset_dir, read_manifest
from magjax.errors import UserError

log = logging.getLogger(__name__)

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
            "image": tfds.features.Image(shape=(FACE_SIZE, FACE_SIZE, 3), encoding_format="jpeg"),
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
                image_size=FACE_SIZE,
                on_size_mismatch=self.on_size_mismatch,
                **self._extra_metadata(),
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
            im = images.decode_rgb(data, self._source_name(source_id))
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
                self._source_name(source_id),
                *size,
                FACE_SIZE,
            )
        self.resized += 1
        im = im.resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    def _skip(self, source_id: int, reason: Exception) -> None:
        """Counts an unreadable record (and logs the first ones)."""
        if len(self.skipped) < _MAX_LOGGED_SKIPS:
            log.warning("skipping %s", reason)
        self.skipped.append(source_id)

    def _class_name(self, label: int) -> str:
        return f"class {label}"

    def _generate_examples(self):
        key, labels = 0, set()
        for source_id, label, data, extra in self._records():
            image = self._checked_image(source_id, data)
            if image is None:
                continue
            yield key, {"image": image, "label": label, "source_id": source_id, **extra}
            labels.add(label)
            key += 1
        # Such a class keeps its label (the others' labels must not shift) and its row in the
        # classifier, which no image then trains: said here, for every source alike.
        empty = [c for c in range(self.num_classes) if c not in labels]
        if empty and key:
            log.warning(
                "%d of %d classes have no readable image (kept, with no image to train them): %s%s",
                len(empty),
                self.num_classes,
                ", ".join(self._class_name(c) for c in empty[:10]),
                " ..." if len(empty) > 10 else "",
            )
        self.info.metadata["classes_without_images"] = len(empty)
        if key == 0:
            source = self._extra_metadata().get("source", type(self).__name__)
            raise UserError(
                f"{source}: no readable image ({len(self.skipped)} skipped, see the log)"
            )
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

    def _class_name(self, label: int) -> str:
        return f"label {label}"

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


def list_image_folder(root: str | os.PathLike, layout: str = "auto") -> tuple[list[str], list]:
    """Lists identities and images of an image folder.

    ``flat``: ``root/<identity>/<image>``; ``split``: ``root/<part>/<identity>/<image>`` with the
    identities of all parts merged (WebFace42M's ``0..9``); ``auto`` picks ``split`` when every
    top-level directory holds only directories. Labels are the positions of the identity names in
    sorted order (torchvision ImageFolder). Hidden entries (names starting with ``.``) are
    ignored; identity folders without image files are not classes (logged); a folder name with
    a line break, or an entry that cannot be followed (a symbolic link loop), is an error.
    Returns (identity names, [(path, label)]).
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
            return bool(entries) and all(_is(e, "dir") for e in entries)

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
            f.path
            for f in _visible(path)
            if f.name.lower().endswith(images.IMAGE_SUFFIXES) and _is(f, "file")
        )
    empty = sorted(identity_dirs[n] for n, found in images_of.items() if not found)
    if empty:
        log.warning(
            "skipping %d identity folders without image files (not classes): %s%s",
            len(empty),
            ", ".join(empty[:10]),
            " ..." if len(empty) > 10 else "",
        )
    names = sorted(n for n, found in images_of.items() if found)
    files = [(path, label) for label, name in enumerate(names) for path in images_of[name]]
    if not files:
        raise UserError(f"{root}: no image files ({', '.join(images.IMAGE_SUFFIXES)}) found")
    return names, files


def _visible(path) -> list[os.DirEntry]:
    """The entries of a directory except hidden ones (``.DS_Store``, ``.git``, ``._x.jpg``)."""
    return [e for e in os.scandir(path) if not e.name.startswith(".")]


def _subdirs(path) -> list[os.DirEntry]:
    return [e for e in _visible(path) if _is(e, "dir")]


def _is(entry: os.DirEntry, kind: str) -> bool:
    """``entry.is_dir()`` / ``is_file()`` (following links; a dangling link is neither), with
    an entry that cannot be followed (a symbolic link loop, a permission error) refused in one
    line naming it, before anything is built."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as error:
        raise UserError(
            f"{entry.path}: cannot be followed: {error.strerror or error}; remove or fix it"
        ) from None


def split_identities(
    names: list[str], files: list, holdout: int
) -> tuple[list[str], list, list[str], list]:
    """``holdout`` identities of ``names`` (among those with two images or more, drawn with a
    fixed seed) set apart from the training ones: ``(train names, train files, held-out names,
    held-out files)``, each file list ``[(path, label)]`` with labels numbering its own names in
    sorted order."""
    if holdout == 0:
        return names, files, [], []
    counts = np.bincount([label for _, label in files], minlength=len(names))
    eligible = np.flatnonzero(counts >= 2)
    if holdout < 2 or holdout > len(eligible) or holdout >= len(names):
        raise UserError(
            f"--holdout {holdout}: must be at least 2 and at most the {len(eligible)} of "
            f"{len(names)} identities with two images or more, leaving one to train on"
        )
    held = set(np.random.default_rng(0).choice(eligible, holdout, replace=False).tolist())

    def part(keep) -> tuple[list[str], list]:
        kept = [label for label in range(len(names)) if keep(label)]
        relabel = {old: new for new, old in enumerate(kept)}
        return (
            [names[label] for label in kept],
            [(path, relabel[label]) for path, label in files if label in relabel],
        )

    return (*part(lambda label: label not in held), *part(lambda label: label in held))


def heldout_pairs(labels: np.ndarray, max_pairs: int, seed: int = 0) -> np.ndarray:
    """Verification pairs ``[P, 3]`` (first, second, same) among images with identity
    ``labels``: as many same-identity pairs as there are (at most ``max_pairs // 2``, drawn at
    random) and as many different-identity pairs, in random order, so the 10-fold protocol's
    folds each hold both kinds."""
    rng = np.random.default_rng(seed)
    same = [
        (a, b)
        for members in (np.flatnonzero(labels == label) for label in np.unique(labels))
        for i, a in enumerate(members)
        for b in members[i + 1 :]
    ]
    if len(same) > max_pairs // 2:
        same = [same[i] for i in rng.choice(len(same), max_pairs // 2, replace=False)]
    different = set()
    while len(different) < len(same):
        a, b = rng.integers(0, len(labels), 2)
        if labels[a] != labels[b]:
            different.add((min(a, b), max(a, b)))
    pairs = np.array([(a, b, 1) for a, b in same] + [(a, b, 0) for a, b in sorted(different)])
    return pairs[rng.permutation(len(pairs))]


def write_heldout_set(
    out: pathlib.Path, files: list, max_pairs: int = 3000, read=images.read_face
) -> int:
    """Writes ``out`` (a verification ``.bin``) from the held-out identities' images ``files``
    (``[(path, label)]``; unreadable ones skipped and logged, others resized to 112x112 as in
    training); returns the number of pairs. ``read(path)`` gives a file's 112x112 face, or None
    to skip it (a photo in which ``--detect`` finds no face)."""
    faces, labels = [], []
    for path, label in files:
        try:
            face = read(path)
        except images.UnreadableImageError as error:
            log.warning("held-out set: skipping %s", error)
            continue
        if face is None:
            log.warning("held-out set: skipping %s: no face found", path)
            continue
        faces.append(face)
        labels.append(label)
    pairs = heldout_pairs(np.asarray(labels), max_pairs)
    if len(pairs) < 10:
        raise UserError(
            f"--holdout: the held-out identities give {len(pairs)} verification "
            "pairs, the 10-fold protocol needs at least 10; hold out more identities"
        )
    faces_array = np.stack(faces)
    verification_bin.write_bin(out, faces_array[pairs[:, :2].reshape(-1)], pairs[:, 2] == 1)
    return len(pairs)


class FaceFolder(_FaceBuilder, skip_registration=True):
    """Face images from an image folder with one sub-folder per identity.

    With ``detect`` (a dict of ``magjax.detect.FaceDetector`` options, ``{}`` for the defaults)
    the images are unaligned photos: each becomes the aligned 112x112 crop of its
    ``primary_face`` (the largest, most central one), and a photo without a face is skipped and
    counted (``no_face`` in the metadata and the manifest).
    """

    def __init__(
        self,
        *,
        src: str | os.PathLike,
        layout: str = "auto",
        holdout: int = 0,
        detect: dict | None = None,
        **kwargs,
    ):
        self.src = pathlib.Path(src)
        names, files = list_image_folder(self.src, layout)
        self.class_names, self.files, self.heldout_names, self.heldout_files = split_identities(
            names, files, holdout
        )
        self.num_classes = len(self.class_names)
        self.detector = None
        self.no_face: list[int] = []
        if detect is not None:
            from magjax.detect import FaceDetector

            # Built here, before anything is written: a missing model is refused at once.
            self.detector = FaceDetector(**detect)
        super().__init__(**kwargs)

    def aligned_face(self, path) -> np.ndarray | None:
        """``--detect``: the aligned crop of the photo's primary face, or None without a face."""
        from magjax.detect import read_photo

        faces, crops = self.detector.faces_and_crops(read_photo(path), one_face=True)
        return crops[0] if len(faces) else None

    def _extra_metadata(self) -> dict:
        return {"source": str(self.src)}

    def _source_name(self, source_id: int) -> str:
        return f"{self.files[source_id][0]} (file {source_id})"

    def _class_name(self, label: int) -> str:
        return repr(self.class_names[label])

    def _records(self):
        for i, (path, label) in enumerate(self.files):
            if self.detector is None:
                yield i, label, pathlib.Path(path).read_bytes(), {}
                continue
            try:
                face = self.aligned_face(path)
            except images.UnreadableImageError as e:
                self._skip(i, e)
                continue
            if face is None:
                if len(self.no_face) < _MAX_LOGGED_SKIPS:
                    log.warning("skipping %s: no face found", self._source_name(i))
                self.no_face.append(i)
                continue
            buf = io.BytesIO()
            Image.fromarray(face).save(buf, format="JPEG", quality=95)
            yield i, label, buf.getvalue(), {}

    def _generate_examples(self):
        try:
            yield from super()._generate_examples()
        except UserError:
            if self.no_face:
                raise UserError(
                    f"{self.src}: no face found in any readable photo "
                    f"({len(self.no_face)} without a face, {len(self.skipped)} "
                    "unreadable; see the log)"
                ) from None
            raise
        if self.detector is not None:
            self.info.metadata["no_face"] = len(self.no_face)
            self.info.metadata["no_face_source_ids"] = self.no_face[:_MAX_LOGGED_SKIPS]
            if self.no_face:
                log.warning("skipped %d photos without a face in total", len(self.no_face))


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


def _normalise(options: dict) -> dict:
    return json.loads(json.dumps(options, sort_keys=True, default=str))


def prepare(
    format: str,
    src: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    progress: bool = True,
    **options,
) -> pathlib.Path:
    """Builds a TFDS dataset from ``src`` into ``out`` and returns ``out`` (the dataset root).

    format: ``rec`` (insightface RecordIO dir), ``folder`` (identity sub-folders; option
    ``layout``), or ``synthetic`` (``src`` unused; options are SyntheticConfig fields).
    Common option: ``on_size_mismatch`` ('resize' | 'error'); folder option ``holdout``: that
    many identities (with two images or more, drawn with a fixed seed) are kept out of the
    training data and written as the verification set ``out/verification.bin`` (their names in
    ``out/heldout.txt``), which training evaluates (``config.eval.heldout_sets``); folder option
    ``detect`` (a dict of ``magjax.detect.FaceDetector`` options): the images are unaligned
    photos, aligned here (see :class:`FaceFolder`).
    ``progress``: TFDS's progress bars on stderr (training builds the demo's data without).
    Idempotent: when ``out`` already
    holds a complete dataset built with the same format and options it is returned as is; one
    built differently is an error rather than a silent mix. Safe to call from several processes
    of one job at once (an exclusive lock on ``out/.prepare.lock``): one builds, the others wait
    and then find the complete dataset.
    """
    out = pathlib.Path(out)
    if format in ("rec", "folder"):
        _need_src(src, format)  # before anything is written into --out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(format, src, out, progress=progress, **options)


def _prepare(format: str, src, out: pathlib.Path, *, progress: bool, **options) -> pathlib.Path:
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
        holdout = options.pop("holdout", 0)
        detect = options.pop("detect", None)
        builder = FaceFolder(
            src=_need_src(src, format),
            layout=layout,
            holdout=holdout,
            detect=detect,
            data_dir=str(out),
            **size_opt,
        )
    elif format == "synthetic":
        cfg = synthetic.SyntheticConfig(**options)
        builder = SyntheticFaces(config=cfg, data_dir=str(out), **size_opt)
    else:
        raise ValueError(f"unknown format {format!r}: expected rec, folder or synthetic")
    if options and format != "synthetic":
        raise TypeError(f"unknown options for format {format}: {sorted(options)}")

    extras: dict = {}
    if format == "folder":
        # Written before the build: nothing that can fail may come after hours of building.
        write_class_names(out / "classes.txt", builder.class_names)
        extras["classes"] = "classes.txt"
        if builder.heldout_files:
            read = builder.aligned_face if builder.detector is not None else images.read_face
            pairs = write_heldout_set(out / "verification.bin", builder.heldout_files, read=read)
            write_class_names(out / "heldout.txt", builder.heldout_names)
            log.info(
                "held out %d identities (%s) as %s: %d pairs",
                len(builder.heldout_names),
                out / "heldout.txt",
                out / "verification.bin",
                pairs,
            )
            extras.update(verification_bins=["verification.bin"], heldout="heldout.txt")

    # A half-written earlier attempt (no manifest) is rebuilt from scratch.
    version_dir = pathlib.Path(builder.data_dir)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    start = time.time()
    if progress:
        log.info("building %s: %d classes", out, builder.num_classes)
    _build_quietly(builder, progress)
    downloads = out / "downloads"
    if downloads.is_dir() and not any(p.is_file() for p in downloads.rglob("*")):
        shutil.rmtree(downloads)  # tfds creates it; nothing is downloaded here

    if cfg is not None:
        jpegs, issame, _, _ = builder.faces.verification_pairs()
        verification_bin.write_bin(out / "verification.bin", jpegs, issame)
        files.write_npz_atomically(out / "quality.npz", builder.faces.quality_set())
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
    if getattr(builder, "detector", None) is not None:
        manifest["no_face"] = len(builder.no_face)
    files.write_text_atomically(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return out


def write_class_names(path: pathlib.Path, names: list[str]) -> None:
    """Writes ``classes.txt``: line ``i`` is the folder name of label ``i``, as the file system
    stores it. Names are UTF-8; a folder name that is not valid UTF-8 keeps its bytes (read the
    file with ``errors="surrogateescape"`` to get the ``os.listdir`` names back) and is named in
    a warning."""
    odd = [n for n in names if not _is_utf8(n)]
    if odd:
        log.warning(
            "%d identity folder names are not valid UTF-8; classes.txt keeps their bytes: %s%s",
            len(odd),
            ", ".join(map(ascii, odd[:5])),
            " ..." if len(odd) > 5 else "",
        )
    path.write_bytes(b"".join(os.fsencode(n) + b"\n" for n in names))


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # os.fsdecode turned undecodable bytes into lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _build_quietly(builder: _FaceBuilder, progress: bool) -> None:
    """``builder.download_and_prepare``, with what TFDS prints on stdout for a download
    ("Downloading and preparing dataset Unknown size ...": nothing is downloaded here) sent to
    the log instead; its progress bars only when ``progress``."""
    stdout = io.StringIO()
    tfds.display_progress_bar(progress)
    try:
        with contextlib.redirect_stdout(stdout):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(verify_ssl=False)
            )
    finally:
        tfds.display_progress_bar(True)  # TFDS's default
        for line in stdout.getvalue().splitlines():
            if line.strip():
                log.debug("tfds: %s", line.strip())


def _need_src(src, format: str) -> pathlib.Path:
    if not src:
        raise UserError(
            f"--src is required for --format {format}: the "
            f"{'RecordIO directory' if format == 'rec' else 'image folder'} to read"
        )
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
        summary.update(
            {
                k: m[k]
                for k in (
                    "format",
                    "src",
                    "options",
                    "verification_bins",
                    "quality_set",
                    "classes",
                    "no_face",
                )
                if k in m
            }
        )
    return summary
