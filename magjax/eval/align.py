"""5-point similarity alignment of a face onto the ArcFace 112x112 template.

As insightface does it (docs/field.md section 1): a least-squares similarity transform
(rotation, uniform scale, translation; skimage ``SimilarityTransform``) from the five landmarks
(left eye, right eye, nose tip, left and right mouth corners, in image pixel coordinates) to the
template, then a bilinear warp with a black border (insightface uses ``cv2.warpAffine``; skimage's
``warp`` with ``order=1`` uses the same pixel-centre convention, intensities may differ by one
grey level through cv2's fixed-point rounding).
"""

from __future__ import annotations

import numpy as np
from skimage.transform import SimilarityTransform, warp

# ArcFace template for 112x112 crops, (x, y) pixel coordinates (insightface eval_ijbc.py `src`).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def estimate_transform(landmarks: np.ndarray, image_size: int = 112) -> SimilarityTransform:
    """Similarity transform mapping ``landmarks`` [5, 2] (x, y) onto the template.

    For ``image_size`` other than 112 the template is scaled by ``image_size / 112``.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must be [5, 2] (x, y) points, got shape {landmarks.shape}")
    if not np.all(np.isfinite(landmarks)):
        raise ValueError(f"landmarks must be finite, got {landmarks.tolist()}")
    template = ARCFACE_TEMPLATE * (image_size / 112.0)
    transform = SimilarityTransform.from_estimate(landmarks, template)
    if not transform:
        raise ValueError(
            f"similarity transform estimation failed for landmarks {landmarks.tolist()}"
        )
    return transform


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Warps ``image`` [H, W, C] uint8 so that ``landmarks`` land on the template.

    Returns a uint8 ``[image_size, image_size, C]`` crop (outside pixels are black).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    transform = estimate_transform(landmarks, image_size)
    # warp takes the output -> input map, i.e. the inverse of landmarks -> template.
    warped = warp(
        image,
        transform.inverse,
        output_shape=(image_size, image_size),
        order=1,
        mode="constant",
        cval=0.0,
        preserve_range=True,
    )
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)
