"""Same-shot test for candidate pairs: local features and a RANSAC homography.

Two photos of one shot (a resized, re-encoded, brightened, cropped or slightly rotated
copy) show the same points at places that one plane-to-plane map (a homography)
explains: most of their local features match, and one homography fits those matches
to within a few pixels. Two different photos that merely look alike (different
motorbikes in one studio pose, airliners on a blue sky) share a layout, which is all
a perceptual hash and a thumbnail correlation see, but not their local texture: few
features match and no single homography explains many of them.

:func:`features` finds ORB keypoints (FAST corners with rotation-aware binary BRIEF
descriptors, scale pyramid) on a grayscale decode normalised to
:data:`FEATURE_SIDE` pixels on its longest side, so copies at other resolutions are
compared at one scale. :func:`match` pairs descriptors by Lowe's ratio test and fits a
homography by RANSAC; :class:`Geometry` holds the inlier count and the inlier ratio
(inliers over the smaller keypoint count) and, the same-shot score, the *exact*
inliers: those whose two binary descriptors are nearly equal. One exposure reproduces
its own patches (resampling and JPEG flip a few of the 256 bits); the same model of
motorbike photographed again on the same studio rig is explained by one homography
too, but its patches differ (reflections, paint, decals). OpenCV does the feature and RANSAC work:
it is the maintained reference implementation of both.

OpenCV (``opencv-python-headless``) ships in the ``clean`` extra (about 150 MB
installed): it is imported on first use only, so the core and the ``descriptor``
method need none of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from kaedama import images
from kaedama.dedup.hashing import decode_for_description
from kaedama.errors import KaedamaError

# Longest side of the grayscale image keypoints are found on. Copies of one photo at
# other resolutions become the same size (same feature scale). 256 px and 300 keypoints
# judge the bench set as well as 384 px and 500 (bench/bench_pairs.py) at half the cost.
FEATURE_SIDE = 256
# Thinner normalised images have no keypoints (ORB's 31 px patches and 8-level pyramid).
MIN_SIDE = 64
# Keypoints kept per image (ORB keeps the strongest by Harris score).
MAX_FEATURES = 300
# ORB's scale pyramid (levels, factor 1.2 each): OpenCV's default. Both images are
# normalised to one size, yet 3 levels lost 3 points of same-shot recall on the bench
# set (crops, rescaled copies) for ~10% less time.
ORB_LEVELS = 8
# FAST corner threshold (OpenCV's default is 20): weaker corners are noise, JPEG
# blocking and smooth gradients, which differ between exposures and add look-alike
# matches. 30 keeps the same-shot and planted results of the bench set and merges one
# different photo less and one near shot more (bench/bench_pairs.py, session 4).
FAST_THRESHOLD = 30
# Lowe's ratio test: a match counts when its best descriptor distance is below this
# fraction of the second best (0.75-0.8 in the literature).
RATIO = 0.8
# RANSAC reprojection tolerance in pixels of the FEATURE_SIDE image (~1%).
REPROJECTION_PX = 4.0
# Below this many ratio-test matches no homography is fitted (it needs 4, and a fit
# to a handful of points is chance).
MIN_MATCHES = 8
# An inlier is "exact" when its two 256-bit ORB descriptors differ in at most this many
# bits: the same patch of the same exposure, resampled or re-encoded. The same object
# photographed again (another bike of the model, the same bike in another colour) gives
# geometric inliers too, but their patches differ by 30-45 bits (bench/bench_pairs.py:
# 20 bits loses crops, 26 merges more look-alikes).
EXACT_BITS = 22
VERSION = (
    f"orb{MAX_FEATURES}l{ORB_LEVELS}f{FAST_THRESHOLD}s{FEATURE_SIDE}"
    f"r{RATIO}p{REPROJECTION_PX}e{EXACT_BITS}"
)
# OpenCV's distributions (any of them provides ``cv2``).
OPENCV_DISTRIBUTIONS = (
    "opencv-python-headless",
    "opencv-python",
    "opencv-contrib-python-headless",
    "opencv-contrib-python",
)


class OpenCVMissingError(KaedamaError):
    """The keypoint methods need OpenCV, which is not installed."""


@lru_cache(maxsize=1)
def cache_key() -> str:
    """What a cached pair test depends on: this test's settings, the decode and the libraries.

    The hash cache keeps each pair's :class:`Geometry` under this key
    (:meth:`kaedama.dedup.hashcache.HashCache.get_pair`): another setting, decode size,
    OpenCV or Pillow gives another key, so an upgrade never answers from old results.
    Read from the installed distributions' metadata: OpenCV is not imported.
    """
    from importlib import metadata

    from kaedama.dedup.hashing import DRAFT_SIZE

    opencv = "none"
    for name in OPENCV_DISTRIBUTIONS:
        try:
            opencv = f"{name}=={metadata.version(name)}"
            break
        except metadata.PackageNotFoundError:
            continue
    pillow = metadata.version("pillow")
    return f"{VERSION}m{MIN_MATCHES}n{MIN_SIDE}d{DRAFT_SIZE}/{opencv}/pillow=={pillow}"


@lru_cache(maxsize=1)
def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise OpenCVMissingError(
            f"the same-shot keypoint test needs OpenCV, which cannot be imported ({exc}): "
            "pip install 'kaedama[clean]' (opencv-python-headless), or choose "
            "--same-shot descriptor"
        ) from exc
    # Workers are processes (or a runner's threads) already: OpenCV's own thread pool
    # would oversubscribe the cores.
    cv2.setNumThreads(1)
    return cv2


def require() -> None:
    """Fail early, before any file is read, when OpenCV is missing (:class:`OpenCVMissingError`).

    Looks the package up without importing it (~0.2 s): a re-run whose pairs the hash
    cache answers never needs it, and forked workers import it where they match. An
    installed OpenCV that cannot be imported (a non-headless build without libGL)
    fails where a pair is first matched, with the import error in the message.
    """
    from importlib.util import find_spec

    if find_spec("cv2") is None:
        _cv2()  # raises the error that says what to install


@dataclass(frozen=True)
class Features:
    """ORB keypoints of one image: ``points`` (n, 2) float32, ``descriptors`` (n, 32) uint8.

    ``size`` is the ``(width, height)`` of the normalised image the points lie on.
    """

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int] = (FEATURE_SIDE, FEATURE_SIDE)

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class Geometry:
    """How well one homography explains the matched keypoints of a pair.

    Attributes:
        keypoints: the smaller of the two images' keypoint counts.
        matches: matches that passed the ratio test.
        inliers: matches within :data:`REPROJECTION_PX` of the RANSAC homography.
        exact: inliers whose descriptors differ in at most :data:`EXACT_BITS` bits.
        coverage: share of the first image's area inside the convex hull of the
            inliers: how much of the picture the homography explains (a logo or
            caption shared by two different pictures covers a small part).
    """

    keypoints: int
    matches: int = 0
    inliers: int = 0
    exact: int = 0
    coverage: float = 0.0

    @property
    def inlier_ratio(self) -> float:
        """Inliers over the smaller keypoint count (0 without keypoints)."""
        return self.inliers / self.keypoints if self.keypoints else 0.0

    @property
    def exact_ratio(self) -> float:
        """Exact inliers over the smaller keypoint count: the same-shot score (0..1)."""
        return self.exact / self.keypoints if self.keypoints else 0.0

    def to_tuple(self) -> tuple[int, int, int, int, float]:
        """Plain values (for a runner's coders): ``(keypoints, matches, inliers, exact, coverage)``."""
        return (self.keypoints, self.matches, self.inliers, self.exact, self.coverage)


NO_GEOMETRY = Geometry(0)


def normalised_gray(image: Image.Image, side: int | None = None) -> np.ndarray:
    """The image as grayscale ``uint8`` scaled to ``side`` (:data:`FEATURE_SIDE`) on its longest side."""
    side = side or FEATURE_SIDE
    gray = image if image.mode == "L" else image.convert("L")
    width, height = gray.size
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != gray.size:
        gray = gray.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(gray, dtype=np.uint8)


def features_of_array(gray: np.ndarray) -> Features:
    """ORB keypoints and descriptors of a grayscale ``uint8`` array.

    An image thinner than :data:`MIN_SIDE` (a 3 x 2000 strip) has no keypoints: ORB
    needs a border of its patch size, and its pyramid would shrink the image to nothing.
    """
    cv2 = _cv2()
    size = (gray.shape[1], gray.shape[0])
    none = Features(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), size)
    if min(size) < MIN_SIDE:
        return none
    orb = cv2.ORB_create(nfeatures=MAX_FEATURES, nlevels=ORB_LEVELS, fastThreshold=FAST_THRESHOLD)
    keypoints, descriptors = orb.detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return none
    points = np.array([kp.pt for kp in keypoints], dtype=np.float32)
    return Features(points, descriptors, size)


def features_of_image(image: Image.Image) -> Features:
    """ORB features of a decoded image (see :func:`features`)."""
    return features_of_array(normalised_gray(image))


def features(
    data: bytes, *, max_pixels: int = images.DEFAULT_MAX_PIXELS, uri: str | None = None
) -> Features:
    """ORB features of one image's bytes, normalised to :data:`FEATURE_SIDE`.

    The decode is the descriptor's (:func:`kaedama.dedup.hashing.decode_for_description`),
    so an engine that describes an image can take its features from the same decode and
    get these same features.

    Raises:
        kaedama.images.ImageError: the bytes are not a readable image.
    """
    return features_of_image(decode_for_description(data, max_pixels=max_pixels, uri=uri))


def match(a: Features, b: Features) -> Geometry:
    """Ratio-test matches of ``a`` in ``b`` and the inliers of a RANSAC homography.

    Deterministic: OpenCV's RANSAC seeds its generator the same way on every call.
    """
    keypoints = min(len(a), len(b))
    if keypoints < 2:
        return Geometry(keypoints)
    cv2 = _cv2()
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    good = [
        pair[0]
        for pair in matcher.knnMatch(a.descriptors, b.descriptors, k=2)
        if len(pair) == 2 and pair[0].distance < RATIO * pair[1].distance
    ]
    if len(good) < MIN_MATCHES:
        return Geometry(keypoints, len(good))
    src = a.points[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = b.points[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    homography, mask = cv2.findHomography(src, dst, cv2.RANSAC, REPROJECTION_PX)
    if homography is None or mask is None:
        return Geometry(keypoints, len(good))
    inlier = mask.ravel().astype(bool)
    exact = inlier & (np.array([m.distance for m in good], dtype=np.float32) <= EXACT_BITS)
    coverage = 0.0
    if inlier.sum() >= 3:
        hull = cv2.convexHull(src[inlier].reshape(-1, 2))
        coverage = min(1.0, float(cv2.contourArea(hull)) / float(a.size[0] * a.size[1]))
    return Geometry(keypoints, len(good), int(inlier.sum()), int(exact.sum()), round(coverage, 6))


def verify_bytes(a: bytes, b: bytes, *, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> Geometry:
    """:func:`match` of two images' bytes (raises :class:`kaedama.images.ImageError`)."""
    return match(features(a, max_pixels=max_pixels), features(b, max_pixels=max_pixels))
