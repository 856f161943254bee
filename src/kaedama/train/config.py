"""The training stage's one frozen config; CLI flags and KFP parameters mirror its fields."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

from kaedama.config import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the manifest and the output URI."""

    # Model
    model: str = field(default="resnet18", metadata={"help": "any timm model name"})
    pretrained: bool = field(
        default=False, metadata={"help": "load pretrained weights (hub or --pretrained-path)"}
    )
    pretrained_path: str = field(
        default="", metadata={"help": "local/gs:// file with pretrained weights (offline)"}
    )
    init_from: str = field(
        default="",
        metadata={
            "help": "start from a kaedama checkpoint's weights (best.pt/last.pt, same model): "
            "all of them with the same classes, else the backbone with a new head; a fresh "
            "run, unlike --resume"
        },
    )
    img_size: int = field(
        default=0, metadata={"help": "input size; 0 = the model's own data config"}
    )
    freeze_until: str = field(
        default="",
        metadata={
            "help": "freeze parameters up to and including this module name prefix (e.g. layer3)"
        },
    )
    layer_decay: float = field(
        default=0.0, metadata={"help": "layer-wise LR decay factor in (0,1); 0 = off"}
    )
    drop_rate: float = field(default=0.0, metadata={"help": "dropout before the classifier"})
    # Schedule and optimiser
    epochs: int = field(default=10, metadata={"help": "number of epochs"})
    batch_size: int = field(default=32, metadata={"help": "per-process batch size"})
    optimizer: Literal["sgd", "adamw", "adabound"] = field(
        default="sgd", metadata={"help": "optimiser"}
    )
    lr: float = field(default=0.01, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=True, metadata={"help": "SGD nesterov momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    final_lr: float = field(
        default=0.1, metadata={"help": "AdaBound final (SGD-like) learning rate"}
    )
    adabound_gamma: float = field(
        default=1e-3, metadata={"help": "AdaBound convergence speed of the bounds"}
    )
    scheduler: Literal["cosine", "step", "none"] = field(
        default="cosine", metadata={"help": "LR schedule after warmup"}
    )
    warmup_epochs: float = field(
        default=1.0, metadata={"help": "linear warmup length in epochs (fractions allowed)"}
    )
    warmup_lr: float = field(default=1e-5, metadata={"help": "LR at the start of warmup"})
    min_lr: float = field(default=1e-6, metadata={"help": "floor of the cosine schedule"})
    milestones: tuple[int, ...] = field(
        default=(30, 60, 90), metadata={"help": "step schedule epochs"}
    )
    step_gamma: float = field(default=0.1, metadata={"help": "step schedule factor"})
    clip_grad: float = field(default=0.0, metadata={"help": "clip gradient norm; 0 = off"})
    ema_decay: float = field(
        default=0.0, metadata={"help": "EMA of weights decay (e.g. 0.9998); 0 = off"}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    # Augmentation (per-image)
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability"})
    vflip: float = field(default=0.0, metadata={"help": "vertical flip probability"})
    scale: tuple[float, ...] = field(
        default=(0.08, 1.0), metadata={"help": "RandomResizedCrop area range"}
    )
    ratio: tuple[float, ...] = field(
        default=(0.75, 1.3333333), metadata={"help": "RandomResizedCrop aspect range"}
    )
    rotation: float = field(default=0.0, metadata={"help": "max rotation in degrees"})
    color_jitter: float = field(
        default=0.4, metadata={"help": "brightness/contrast/saturation jitter"}
    )
    pca_noise: float = field(
        default=0.1, metadata={"help": "AlexNet-style PCA lighting noise std; 0 = off"}
    )
    random_erasing: float = field(default=0.25, metadata={"help": "RandomErasing probability"})
    # Augmentation (batch-level); one method is drawn per batch by these probabilities
    mixup_alpha: float = field(default=0.2, metadata={"help": "mixup Beta(alpha, alpha)"})
    mixup_prob: float = field(default=0.0, metadata={"help": "probability a batch uses mixup"})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix Beta(alpha, alpha)"})
    cutmix_prob: float = field(default=0.0, metadata={"help": "probability a batch uses CutMix"})
    ricap_beta: float = field(
        default=0.3, metadata={"help": "RICAP Beta(beta, beta) for the crossing point"}
    )
    ricap_prob: float = field(default=0.0, metadata={"help": "probability a batch uses RICAP"})
    icap_beta: float = field(
        default=0.3, metadata={"help": "ICAP Beta(beta, beta) for the crossing point"}
    )
    icap_prob: float = field(default=0.0, metadata={"help": "probability a batch uses ICAP"})
    # Data
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    balance: Literal["none", "oversample", "weighted"] = field(
        default="none", metadata={"help": "class balancing"}
    )
    max_pixels: int = field(
        default=64_000_000,
        metadata={"help": "refuse images larger than this (decompression bombs)"},
    )
    # Speed
    threads: int = field(
        default=0,
        metadata={"help": "CPU threads per process (torch.set_num_threads); 0 = torch's default"},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    amp: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "mixed precision (GPU)"}
    )
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    # Run control
    seed: int = field(default=0, metadata={"help": "random seed"})
    checkpoint_every_steps: int = field(
        default=0, metadata={"help": "also checkpoint every N steps; 0 = per epoch only"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the last checkpoint in the output"}
    )
    trials: int = field(default=1, metadata={"help": "repeat with N seeds and report mean/std"})
    max_steps_per_epoch: int = field(
        default=0, metadata={"help": "cap steps per epoch (smoke runs); 0 = full epoch"}
    )
    time_budget: str = field(
        default="",
        metadata={
            "help": "wall-time budget for training, e.g. 90m, 2h, 1h30m, 600s (checked "
            "before every step; then validation, checkpoints and test run); empty = none"
        },
    )
    early_stop_patience: int = field(
        default=0,
        metadata={"help": "stop after N epochs without a better val accuracy; 0 = off"},
    )

    @property
    def budget_seconds(self) -> float | None:
        """``time_budget`` in seconds, or None without one."""
        return parse_duration(self.time_budget) if self.time_budget.strip() else None

    def __post_init__(self) -> None:
        """Refuse values that would only fail later, deep in torch, with a clear message."""
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))


_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([hms])")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """``90m``, ``2h``, ``1h30m``, ``45s`` or plain seconds (``600``) -> seconds.

    Raises:
        ConfigError: anything else, or a duration that is not positive.
    """
    spec = text.strip().lower().replace(" ", "")
    try:
        seconds = float(spec)
    except ValueError:
        parts = _DURATION.findall(spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise ConfigError(
                f"time_budget={text!r} is not a duration; write e.g. 90m, 2h, 1h30m or 600s"
            ) from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"time_budget={text!r} must be a positive duration")
    return seconds


def _problems(cfg: TrainConfig) -> list[str]:
    """Every invalid field of ``cfg``, as ``name: what is wrong (what to do)``."""
    out: list[str] = []

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            out.append(f"{name}={getattr(cfg, name)!r} {rule}")

    # Literal fields: a direct TrainConfig(...) bypasses the CLI's choices.
    for name, tp in typing.get_type_hints(TrainConfig).items():
        if typing.get_origin(tp) is Literal:
            allowed = typing.get_args(tp)
            need(getattr(cfg, name) in allowed, name, f"must be one of {list(allowed)}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{f.name}={value!r} must be a finite number")
    for name in ("epochs", "batch_size", "trials"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    for name in ("img_size", "workers", "threads", "checkpoint_every_steps", "max_steps_per_epoch"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.lr > 0, "lr", "must be > 0")
    for name in (
        "momentum",
        "weight_decay",
        "final_lr",
        "adabound_gamma",
        "warmup_epochs",
        "warmup_lr",
        "min_lr",
        "drop_rate",
        "clip_grad",
        "rotation",
        "color_jitter",
        "pca_noise",
        "mixup_alpha",
        "cutmix_alpha",
        "ricap_beta",
        "icap_beta",
    ):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.momentum < 1, "momentum", "must be < 1")
    need(cfg.drop_rate < 1, "drop_rate", "must be < 1")
    need(0 <= cfg.layer_decay < 1, "layer_decay", "must be in [0, 1) (0 = off)")
    need(0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = off)")
    need(0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    need(cfg.step_gamma > 0, "step_gamma", "must be > 0")
    need(cfg.max_pixels > 0, "max_pixels", "must be > 0")
    for name in ("hflip", "vflip", "random_erasing", "mixup_prob", "cutmix_prob"):
        need(0 <= getattr(cfg, name) <= 1, name, "is a probability: must be in [0, 1]")
    for name in ("ricap_prob", "icap_prob"):
        need(0 <= getattr(cfg, name) <= 1, name, "is a probability: must be in [0, 1]")
    mix = cfg.mixup_prob + cfg.cutmix_prob + cfg.ricap_prob + cfg.icap_prob
    if mix > 1 + 1e-9:
        out.append(f"mixup/cutmix/ricap/icap probabilities sum to {mix:g}; they must sum to <= 1")
    need(
        len(cfg.scale) == 2 and 0 < cfg.scale[0] <= cfg.scale[1] <= 1,
        "scale",
        "must be two area fractions lo,hi with 0 < lo <= hi <= 1",
    )
    need(
        len(cfg.ratio) == 2 and 0 < cfg.ratio[0] <= cfg.ratio[1],
        "ratio",
        "must be two aspect ratios lo,hi with 0 < lo <= hi",
    )
    need(
        all(m > 0 for m in cfg.milestones) and list(cfg.milestones) == sorted(cfg.milestones),
        "milestones",
        "must be increasing epochs > 0",
    )
    need(bool(cfg.model.strip()), "model", "must name a timm model")
    if cfg.init_from and (cfg.pretrained or cfg.pretrained_path):
        out.append("init_from replaces the pretrained weights: drop --pretrained/--pretrained-path")
    need(cfg.early_stop_patience >= 0, "early_stop_patience", "must be >= 0 (0 = off)")
    if cfg.time_budget.strip():
        try:
            parse_duration(cfg.time_budget)
        except ConfigError as exc:
            out.append(str(exc))
    return out
