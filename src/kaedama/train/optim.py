"""Optimisation: parameter groups (freeze, no-decay, layer-wise LR decay), optimisers
(SGD, AdamW, AdaBound), the warmup + cosine/step LR schedule, gradient clipping and an EMA of
the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from kaedama.errors import KaedamaError
from kaedama.train.config import TrainConfig

# --------------------------------------------------------------------------- AdaBound


class AdaBound(torch.optim.Optimizer):
    """AdaBound (Luo et al., ICLR 2019): Adam whose per-element step is clipped into bounds
    that converge to an SGD learning rate ``final_lr``.

    Same update as the reference ``adabound`` package: L2 weight decay added to the gradient,
    bias-corrected Adam step ``lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)`` clipped to
    ``[final_lr * (1 - 1/(gamma t + 1)), final_lr * (1 + 1/(gamma t))]``, times the first
    moment. ``final_lr`` follows LR schedules: it is scaled by ``lr / base_lr``, where
    ``base_lr`` is the group's lr when the optimiser was built (kept in the group, so it
    survives ``state_dict()``/``load_state_dict()``).

    Args:
        params: parameters or parameter groups.
        lr: Adam learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        final_lr: the SGD learning rate the bounds converge to.
        gamma: convergence speed of the bounds.
        eps: denominator term for numerical stability.
        weight_decay: L2 penalty.
        amsbound: use the running maximum of the second moment (AMSBound).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if final_lr < 0.0:
            raise ValueError(f"Invalid final learning rate: {final_lr}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma parameter: {gamma}")
        defaults = dict(
            lr=lr,
            betas=betas,
            final_lr=final_lr,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            amsbound=amsbound,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            base_lr = group["base_lr"]
            final_lr = group["final_lr"] * lr / base_lr if base_lr > 0 else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AdaBound does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsbound"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                state["step"] += 1
                t = state["step"]
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsbound"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    denom = state["max_exp_avg_sq"].sqrt().add_(group["eps"])
                else:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                gamma = group["gamma"]
                lower = final_lr * (1 - 1 / (gamma * t + 1))
                upper = final_lr * (1 + 1 / (gamma * t)) if gamma > 0 else math.inf
                bounded = torch.full_like(denom, step_size).div_(denom).clamp_(lower, upper)
                p.sub_(bounded.mul_(exp_avg))
        return loss


# --------------------------------------------------------------------------- parameter groups


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def freeze_until(model: nn.Module, prefix: str) -> list[str]:
    """Freeze every parameter up to and including the module named ``prefix``.

    Order is ``model.named_parameters()`` order (the forward order for timm models): all
    parameters before the last one under ``prefix`` get ``requires_grad=False``. E.g.
    ``layer3`` on a ResNet freezes the stem, layer1, layer2 and layer3.

    Returns:
        The names of the frozen parameters.

    Raises:
        KaedamaError: no module or parameter is called ``prefix``.
    """
    names = [n for n, _ in model.named_parameters()]
    hits = [i for i, n in enumerate(names) if _matches(n, prefix)]
    if not hits:
        top = ", ".join(n for n, _ in model.named_children())
        raise KaedamaError(
            f"freeze_until={prefix!r} names no module with parameters in this model; "
            f"use a module name prefix such as one of: {top}"
        )
    last = hits[-1]
    frozen = []
    for i, (name, param) in enumerate(model.named_parameters()):
        if i > last:
            break
        param.requires_grad_(False)
        frozen.append(name)
    return frozen


def eval_frozen_norms(model: nn.Module) -> int:
    """Put every batch-norm layer whose parameters are all frozen into eval mode.

    A frozen backbone should also keep its running statistics: in train mode BatchNorm
    would still re-estimate them from the (small, augmented) fine-tuning batches. Call after
    each ``model.train()``.

    Returns:
        How many layers were switched to eval mode.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                count += 1
    return count


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimiser parameter groups for ``model``.

    - ``cfg.freeze_until``: parameters up to that module are frozen and left out.
    - No weight decay on 1-D parameters (norm weights, biases) nor the model's
      ``no_weight_decay()`` names.
    - ``cfg.layer_decay`` in (0, 1): timm's layer-wise LR decay; each group carries
      ``lr_scale`` (1.0 for the head, ``layer_decay**k`` k layers below it).

    Every group has ``params``, ``weight_decay`` and ``lr_scale``.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if cfg.freeze_until:
        freeze_until(model, cfg.freeze_until)
    if not 0.0 <= cfg.layer_decay <= 1.0:
        raise KaedamaError(f"layer_decay must be in (0, 1] (or 0 = off), got {cfg.layer_decay}")
    skip = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    if cfg.layer_decay > 0:
        groups = param_groups_layer_decay(
            model,
            weight_decay=cfg.weight_decay,
            layer_decay=cfg.layer_decay,
            no_weight_decay_list=skip,
        )
    else:
        groups = param_groups_weight_decay(
            model, weight_decay=cfg.weight_decay, no_weight_decay_list=skip
        )
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise KaedamaError(
            f"no trainable parameters left (freeze_until={cfg.freeze_until!r} froze them all); "
            "name an earlier module"
        )
    return groups


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` over :func:`param_groups`.

    Each group's lr is ``cfg.lr * lr_scale * group["lr_scale"]`` (``lr_scale`` e.g. for the
    linear scaling rule under data parallelism); AdaBound's ``final_lr`` is scaled alike.
    """
    groups = param_groups(model, cfg)
    for group in groups:
        group["lr"] = cfg.lr * lr_scale * group["lr_scale"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr * lr_scale,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr * lr_scale)
    if cfg.optimizer == "adabound":
        for group in groups:
            group["final_lr"] = cfg.final_lr * lr_scale * group["lr_scale"]
        return AdaBound(
            groups, lr=cfg.lr * lr_scale, final_lr=cfg.final_lr, gamma=cfg.adabound_gamma
        )
    raise KaedamaError(f"unknown optimizer {cfg.optimizer!r}; use sgd, adamw or adabound")


# --------------------------------------------------------------------------- LR schedule


class WarmupScheduler(LRScheduler):
    """Linear warmup then cosine, step or constant; stepped once per optimiser step.

    Every group's lr is its initial lr times a factor, so layer-wise scales are kept.
    The factor starts at ``warmup_lr / lr`` and grows linearly to 1 over ``warmup_steps``;
    then "cosine" anneals it to ``min_lr / lr`` at ``total_steps``, "step" multiplies by
    ``gamma`` at each milestone step, "none" keeps 1. ``warmup_lr`` and ``min_lr`` are thus
    relative to the peak lr and scale with it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: str,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_factor: float = 0.0,
        min_factor: float = 0.0,
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if schedule not in ("cosine", "step", "none"):
            raise KaedamaError(f"unknown scheduler {schedule!r}; use cosine, step or none")
        self.schedule = schedule
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.warmup_factor = float(warmup_factor)
        self.min_factor = float(min_factor)
        self.milestones = tuple(sorted(int(m) for m in milestones))
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The lr multiplier after ``step`` optimiser steps."""
        if step < self.warmup_steps:
            return self.warmup_factor + (1.0 - self.warmup_factor) * step / self.warmup_steps
        if self.schedule == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (
                1.0 + math.cos(math.pi * progress)
            )
        if self.schedule == "step":
            return self.gamma ** sum(1 for m in self.milestones if step >= m)
        return 1.0

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule and put the optimiser's lrs where they were at save time."""
        super().load_state_dict(state_dict)
        # The constructor set the lrs of step 0; the next optimiser step must use the saved step's.
        f = self.factor(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> WarmupScheduler:
    """The LR schedule of ``cfg`` in optimiser steps (call ``.step()`` after each one).

    Args:
        optimizer: from :func:`build_optimizer` (its lrs are the peaks).
        cfg: epochs, scheduler, warmup_epochs, warmup_lr, min_lr, milestones, step_gamma, lr.
        steps_per_epoch: optimiser steps per epoch (after any max_steps_per_epoch cap).
    """
    if steps_per_epoch < 1:
        raise KaedamaError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    peak = cfg.lr if cfg.lr > 0 else 1.0
    return WarmupScheduler(
        optimizer,
        schedule=cfg.scheduler,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        warmup_factor=min(cfg.warmup_lr / peak, 1.0),
        min_factor=min(cfg.min_lr / peak, 1.0),
        milestones=tuple(m * steps_per_epoch for m in cfg.milestones),
        gamma=cfg.step_gamma,
    )


# --------------------------------------------------------------------------- EMA, clipping


class ModelEma(ModelEmaV3):
    """Exponential moving average of a model's weights and buffers (timm's ModelEmaV3).

    ``update(model)`` after each optimiser step; evaluate ``ema.module``; checkpoint with
    ``state_dict()`` / ``load_state_dict()``. Pass the bare model (not DDP/compiled wrappers).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        if not 0.0 < decay < 1.0:
            raise KaedamaError(f"ema_decay must be in (0, 1), got {decay}")
        super().__init__(model, decay=decay)
        # The average is never trained; no autograd bookkeeping when evaluating it.
        self.module.requires_grad_(False)


def clip_gradients(model: nn.Module, max_norm: float) -> float | None:
    """Clip the global gradient norm to ``max_norm``; returns the norm before clipping.

    Returns None when ``max_norm <= 0`` (clipping off). With AMP, unscale first.
    """
    if max_norm <= 0:
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
