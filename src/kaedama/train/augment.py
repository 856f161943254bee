"""Training augmentation: per-image transforms and batch-level image mixing with soft targets.

Per image (in the DataLoader workers): RandomResizedCrop, flips, rotation, colour jitter,
AlexNet-style PCA lighting noise, normalisation and RandomErasing.

Per batch (in the training loop): one of mixup, CutMix, RICAP or ICAP is drawn by the
configured probabilities. Every method returns soft targets, one row per image summing to
one, so the loss is always :func:`soft_target_cross_entropy`; the label weights of CutMix,
RICAP and ICAP are the pasted areas, so the loss is weighted by patch area.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from kaedama.errors import KaedamaError
from kaedama.train.config import TrainConfig

# Eigen-decomposition of the RGB covariance of ImageNet pixels (in [0, 1]) used by AlexNet's
# "PCA lighting" augmentation (Krizhevsky et al. 2012), as published with fb.resnet.torch.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

METHODS = ("none", "mixup", "cutmix", "ricap", "icap")


# --------------------------------------------------------------------------- per image


class Lighting:
    """AlexNet-style PCA lighting noise on a CHW RGB tensor in [0, 1].

    Adds ``eigvec @ (alpha * eigval)`` to every pixel, with ``alpha ~ N(0, std)`` drawn once
    per image, i.e. shifts the image's colour along the principal axes of natural images.

    Args:
        std: standard deviation of ``alpha``; 0 returns the image unchanged.
        eigval: the three eigenvalues of the pixel covariance.
        eigvec: 3x3 matrix whose columns are the eigenvectors.
    """

    def __init__(
        self,
        std: float,
        eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC,
    ) -> None:
        self.std = float(std)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.std <= 0:
            return img
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"Lighting expects a 3xHxW RGB tensor, got shape {tuple(img.shape)}")
        alpha = torch.randn(3, generator=generator) * self.std
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.to(dtype=img.dtype, device=img.device).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std})"


def resolve_data_config(data_config: dict, cfg: TrainConfig | None = None) -> dict:
    """A copy of timm's data config with ``cfg.img_size`` (when > 0) as the input size."""
    resolved = dict(data_config)
    if cfg is not None and cfg.img_size > 0:
        channels = tuple(resolved.get("input_size", (3, 224, 224)))[0]
        resolved["input_size"] = (channels, cfg.img_size, cfg.img_size)
    return resolved


def _interpolation(name: str) -> T.InterpolationMode:
    # timm's data configs name the mode ("bicubic"); "random" only exists in timm's own pipeline.
    modes = {
        "nearest": T.InterpolationMode.NEAREST,
        "bilinear": T.InterpolationMode.BILINEAR,
        "bicubic": T.InterpolationMode.BICUBIC,
        "lanczos": T.InterpolationMode.LANCZOS,
        "box": T.InterpolationMode.BOX,
        "hamming": T.InterpolationMode.HAMMING,
    }
    return modes.get(str(name or "bilinear").lower(), T.InterpolationMode.BILINEAR)


def build_train_transform(
    data_config: dict, cfg: TrainConfig
) -> Callable[[Image.Image], torch.Tensor]:
    """The per-image training transform: PIL RGB image in, normalised CHW float tensor out.

    Order: RandomResizedCrop -> hflip/vflip -> rotation -> ColorJitter -> ToTensor ->
    PCA lighting -> Normalize -> RandomErasing. Steps whose strength is 0 are left out.

    Args:
        data_config: ``timm.data.resolve_model_data_config(model)`` (input_size,
            interpolation, mean, std, ...).
        cfg: the training config (scale, ratio, hflip, vflip, rotation, color_jitter,
            pca_noise, random_erasing, img_size).
    """
    dc = resolve_data_config(data_config, cfg)
    _, height, width = tuple(dc["input_size"])
    interpolation = _interpolation(dc.get("interpolation", "bilinear"))
    if len(cfg.scale) != 2 or len(cfg.ratio) != 2:
        raise KaedamaError(
            f"scale and ratio need two values each (min max), got scale={cfg.scale} "
            f"ratio={cfg.ratio}"
        )
    steps: list[Callable] = [
        T.RandomResizedCrop(
            (height, width),
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            interpolation=interpolation,
        )
    ]
    if cfg.hflip > 0:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        steps.append(T.RandomVerticalFlip(cfg.vflip))
    if cfg.rotation > 0:
        steps.append(T.RandomRotation(cfg.rotation, interpolation=T.InterpolationMode.BILINEAR))
    if cfg.color_jitter > 0:
        cj = cfg.color_jitter
        steps.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    steps.append(T.ToTensor())
    if cfg.pca_noise > 0:
        steps.append(Lighting(cfg.pca_noise))
    steps.append(T.Normalize(mean=tuple(dc["mean"]), std=tuple(dc["std"])))
    if cfg.random_erasing > 0:
        # value=0 erases to the dataset mean colour, since the tensor is already normalised.
        steps.append(T.RandomErasing(p=cfg.random_erasing, value=0))
    return T.Compose(steps)


# --------------------------------------------------------------------------- targets and loss


def one_hot_smooth(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot float targets with label smoothing (timm's convention).

    The true class gets ``1 - smoothing + smoothing / num_classes``, every other class
    ``smoothing / num_classes``, so each row sums to one.
    """
    off = smoothing / num_classes
    out = torch.full(
        (targets.shape[0], num_classes), off, dtype=torch.float32, device=targets.device
    )
    return out.scatter_(1, targets.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over the batch."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return torch.sum(-soft_targets * log_probs, dim=-1).mean()


# --------------------------------------------------------------------------- batch mixing


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    lam: float,
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup with the batch flipped as partner (image ``i`` mixes with ``B-1-i``, like timm).

    Returns ``lam * x + (1 - lam) * x.flip(0)`` and the same mixture of the smoothed one-hot
    targets.
    """
    mixed = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
    y = one_hot_smooth(targets, num_classes, smoothing)
    return mixed, y * lam + y.flip(0) * (1.0 - lam)


def cutmix_box(
    height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A CutMix box ``(y0, y1, x0, x1)`` covering about ``1 - lam`` of the image (timm's recipe).

    The box has sides ``H*sqrt(1-lam)`` by ``W*sqrt(1-lam)`` around a uniform random centre
    and is clipped to the image, so its real area can be smaller; see :func:`cutmix`.
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return y0, y1, x0, x1


def cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    box: tuple[int, int, int, int],
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: paste ``box`` (y0, y1, x0, x1) of the flipped batch into each image.

    The label weight of the pasted image is the box's actual area fraction (timm's
    ``correct_lam=True``), so the weights follow the pixels even where the box was clipped.
    """
    y0, y1, x0, x1 = box
    height, width = images.shape[-2:]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
    y = one_hot_smooth(targets, num_classes, smoothing)
    return mixed, y * lam + y.flip(0) * (1.0 - lam)


@dataclass(frozen=True)
class Patch:
    """One of the four RICAP/ICAP patches.

    ``out[:, :, dst_y:dst_y+height, dst_x:dst_x+width] ==
    images[perm][:, :, src_y:src_y+height, src_x:src_x+width]``.
    """

    perm: torch.Tensor  # source image index for every output image
    src_x: int
    src_y: int
    dst_x: int
    dst_y: int
    width: int
    height: int
    weight: float  # patch area / image area


@dataclass(frozen=True)
class PatchGeometry:
    """Where the four patches of a RICAP/ICAP batch came from and went."""

    boundary_x: int  # w: width of the left column
    boundary_y: int  # h: height of the top row
    patches: tuple[Patch, Patch, Patch, Patch]


def _patch_images(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    beta: float,
    rng: np.random.Generator,
    smoothing: float,
    same_position: bool,
) -> tuple[torch.Tensor, torch.Tensor, PatchGeometry]:
    batch, _, height, width = images.shape
    w = int(round(width * rng.beta(beta, beta)))
    h = int(round(height * rng.beta(beta, beta)))
    # Top-left, top-right, bottom-left, bottom-right, as (dst_x, dst_y, width, height).
    layout = (
        (0, 0, w, h),
        (w, 0, width - w, h),
        (0, h, w, height - h),
        (w, h, width - w, height - h),
    )
    out = torch.empty_like(images)
    soft = torch.zeros(batch, num_classes, dtype=torch.float32, device=targets.device)
    y = one_hot_smooth(targets, num_classes, smoothing)
    patches = []
    for dst_x, dst_y, pw, ph in layout:
        perm_cpu = torch.from_numpy(rng.permutation(batch))
        perm = perm_cpu.to(images.device)
        if same_position:
            src_x, src_y = dst_x, dst_y
        else:
            src_x = int(rng.integers(0, width - pw + 1))
            src_y = int(rng.integers(0, height - ph + 1))
        out[:, :, dst_y : dst_y + ph, dst_x : dst_x + pw] = images[
            perm, :, src_y : src_y + ph, src_x : src_x + pw
        ]
        weight = pw * ph / float(width * height)
        soft += weight * y[perm.to(targets.device)]
        patches.append(Patch(perm_cpu, src_x, src_y, dst_x, dst_y, pw, ph, weight))
    return out, soft, PatchGeometry(w, h, tuple(patches))


def ricap(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    beta: float,
    rng: np.random.Generator,
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, PatchGeometry]:
    """RICAP (Takahashi et al. 2018): patch four random crops from four shuffles of the batch.

    The crossing point ``(w, h)`` is drawn from ``Beta(beta, beta)`` over the image's width
    and height; patch ``k`` (sizes (w,h), (W-w,h), (w,H-h), (W-w,H-h)) comes from a random
    permutation of the batch at a random position inside its source image. Each target row is
    the area-weighted sum of the four sources' (smoothed) one-hot labels.

    Returns:
        (patched images, soft targets, patch geometry).
    """
    return _patch_images(images, targets, num_classes, beta, rng, smoothing, same_position=False)


def icap(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    beta: float,
    rng: np.random.Generator,
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, PatchGeometry]:
    """ICAP: RICAP where each patch is cut from the same place in its source as it is pasted.

    The output is a quilt of four images, each seen through its own quadrant window, so
    objects keep their position in the frame (no random crop offset).

    Returns:
        (patched images, soft targets, patch geometry).
    """
    return _patch_images(images, targets, num_classes, beta, rng, smoothing, same_position=True)


class BatchMixer:
    """Draws one batch-level method per batch and returns images with soft targets.

    With probability ``cfg.mixup_prob`` mixup, ``cfg.cutmix_prob`` CutMix, ``cfg.ricap_prob``
    RICAP, ``cfg.icap_prob`` ICAP, and otherwise the batch unchanged. Targets always come back
    as smoothed one-hot rows (``cfg.label_smoothing``), so one soft-target loss serves all.

    Randomness comes from ``generator`` (or torch's global RNG), so a seeded run repeats.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        if num_classes < 1:
            raise KaedamaError(f"need at least one class to train, got num_classes={num_classes}")
        self.num_classes = num_classes
        self.smoothing = float(cfg.label_smoothing)
        if not 0.0 <= self.smoothing < 1.0:
            raise KaedamaError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        probs = {
            "mixup": cfg.mixup_prob,
            "cutmix": cfg.cutmix_prob,
            "ricap": cfg.ricap_prob,
            "icap": cfg.icap_prob,
        }
        params = {
            "mixup": cfg.mixup_alpha,
            "cutmix": cfg.cutmix_alpha,
            "ricap": cfg.ricap_beta,
            "icap": cfg.icap_beta,
        }
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise KaedamaError(f"{name}_prob must be in [0, 1], got {p}")
            if p > 0 and params[name] <= 0:
                raise KaedamaError(
                    f"{name} is enabled ({name}_prob={p}) but its Beta parameter is "
                    f"{params[name]}; set it > 0 (e.g. 0.2 for mixup, 1.0 for CutMix, 0.3 for "
                    "RICAP/ICAP) or set the probability to 0"
                )
        total = sum(probs.values())
        if total > 1.0 + 1e-9:
            raise KaedamaError(
                "mixup_prob + cutmix_prob + ricap_prob + icap_prob must be at most 1 (one method "
                f"per batch), got {total:g}"
            )
        self.probs = probs
        self.params = params
        self.last_method = "none"

    @property
    def enabled(self) -> bool:
        """Whether any batch-level method can be drawn."""
        return any(p > 0 for p in self.probs.values())

    def choose(self, rng: np.random.Generator) -> str:
        """Draw the method for one batch."""
        u = rng.random()
        edge = 0.0
        for name, p in self.probs.items():
            edge += p
            if u < edge:
                return name
        return "none"

    def __call__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch.

        Args:
            images: float ``[B, C, H, W]``.
            targets: class indices ``[B]``.
            generator: torch RNG to draw from (CPU); torch's global RNG when None.

        Returns:
            (images, soft targets ``[B, num_classes]``, each row summing to 1).
        """
        # One 63-bit draw from torch's RNG seeds numpy's for the Beta draws and permutations.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        method = self.choose(rng) if self.enabled else "none"
        self.last_method = method
        if method == "none":
            return images, one_hot_smooth(targets, self.num_classes, self.smoothing)
        param = self.params[method]
        if method == "mixup":
            lam = float(rng.beta(param, param))
            return mixup(images, targets, self.num_classes, lam, self.smoothing)
        if method == "cutmix":
            lam = float(rng.beta(param, param))
            box = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
            return cutmix(images, targets, self.num_classes, box, self.smoothing)
        fn = ricap if method == "ricap" else icap
        mixed, soft, _ = fn(images, targets, self.num_classes, param, rng, self.smoothing)
        return mixed, soft
