"""The distributed runtime and stop signals of a training run.

Distributed runs are started by ``torchrun`` (or a Kubeflow TrainJob, which sets the
same variables): ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` select DDP over gloo (CPU) or NCCL (GPU); without them the same code
runs as one process. Before every step the ranks agree (:func:`consensus`) on how many
readable images they hold and whether any received SIGTERM or SIGINT, so all stop at
the same step with a resumable checkpoint (:class:`Preempted`).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kaedama.errors import KaedamaError
from kaedama.train.config import TrainConfig

# Signals that stop a run at the next step with a resumable checkpoint (first = preferred).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainError(KaedamaError):
    """A training run cannot start or continue (bad device, incompatible resume, ...)."""


class Preempted(KaedamaError):
    """The run stopped on SIGTERM/SIGINT after writing a resumable ``last.pt``.

    Attributes:
        signum: the signal received (by at least one rank).
        exit_code: ``128 + signum``, the shell's code for death by that signal
            (143 for SIGTERM, 130 for SIGINT), so schedulers see an interrupted job.
        epoch, step: the position saved in ``last.pt`` (completed epochs, steps into the next).
    """

    def __init__(self, signum: int, epoch: int, step: int, checkpoint: str):
        self.signum, self.epoch, self.step = signum, epoch, step
        self.exit_code = 128 + signum
        where = f"after epoch {epoch}" if step == 0 else f"at epoch {epoch + 1} step {step}"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} {where}; {checkpoint} holds the state: "
            "run the same command with --resume to continue"
        )


# --------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process initialised the process group (and tears it down)
    # Group for the per-step host-side exchange: a gloo group beside NCCL so that it
    # never waits for the GPU stream; None = the default (already gloo) group.
    cpu_group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise TrainError(f"device {spec!r} is not valid; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
    return device


def init_runtime(cfg: TrainConfig) -> Runtime:
    """Join the process group described by torchrun's environment (if any) and pick a device.

    The environment is read here, at call time: ``WORLD_SIZE`` > 1 means DDP with
    ``env://`` rendezvous (``MASTER_ADDR``/``MASTER_PORT``), NCCL on GPUs, gloo on CPU.
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    owns, cpu_group = False, None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns = True
        if dist.get_backend() != "gloo":
            cpu_group = dist.new_group(backend="gloo")  # collective: every rank creates it
    return Runtime(
        rank=rank,
        world=world,
        local_rank=local_rank,
        device=device,
        owns_group=owns,
        cpu_group=cpu_group,
    )


def close_runtime(rt: Runtime) -> None:
    """Leave the process group if :func:`init_runtime` joined it."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum ``t`` over ranks (returns a new tensor; identity for one process)."""
    t = t.clone()
    if rt.distributed:
        device = rt.device if dist.get_backend() == "nccl" else torch.device("cpu")
        moved = t.to(device)
        dist.all_reduce(moved)
        t = moved.to(t.device)
    return t


def all_gather(t: torch.Tensor, rt: Runtime) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (on CPU), in rank order."""
    if not rt.distributed:
        return [t.cpu()]
    device = rt.device if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(t, device=device) for _ in range(rt.world)]
    dist.all_gather(parts, t.to(device))
    return [p.cpu() for p in parts]


def weights_fingerprint(model: nn.Module) -> torch.Tensor:
    """Three float64 numbers that change with any weight: sum, sum of squares, ramp-weighted sum."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    ramp = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), (flat * flat).sum(), (flat * ramp).sum()])


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def consensus(good: int, signum: int, rt: Runtime, over: bool = False) -> tuple[int, int, bool]:
    """This step's readable images over all ranks, the stop signal any rank received, and
    whether any rank ran out of time budget.

    One all-reduce of four integers over the CPU group, so it never waits for a GPU.

    Args:
        good: readable images in this rank's batch.
        signum: the stop signal this rank received (0 = none).
        over: this rank's clock says the time budget is spent.

    Returns:
        ``(images over all ranks, signal, over)``: SIGTERM if any rank got it, else SIGINT
        if any got that, else 0; ``over`` if any rank's budget is spent. Every rank gets
        the same answer, so all stop together.
    """
    if not rt.distributed:
        return good, signum, over
    flags = [int(signum == sig) for sig in STOP_SIGNALS]
    t = torch.tensor([good, *flags, int(over)], dtype=torch.int64)
    dist.all_reduce(t, group=rt.cpu_group)
    counts = t[1:].tolist()
    received = [sig for sig, n in zip(STOP_SIGNALS, counts[:-1], strict=True) if n]
    return int(t[0]), int(received[0]) if received else 0, bool(counts[-1])


# --------------------------------------------------------------------------- preemption


class StopSignal:
    """While entered, SIGTERM/SIGINT only record a request to stop at the next step.

    The loop polls :meth:`received` before every step (through :func:`consensus`, so
    all ranks agree) and stops cleanly. A second signal is not held back: the previous handler is put back
    and the signal raised again (kill -TERM twice, or Ctrl-C twice, ends the process now).
    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def received(self) -> int:
        """The stop signal received so far (0 = none); the loop polls this once per step."""
        return self.signum

    def _handle(self, signum: int, frame: object) -> None:
        # No logging here: a handler runs between two bytecodes of the main thread,
        # possibly inside a logging call; the loop reports the request when it sees it.
        if self.signum:
            previous = self._previous.get(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum


def ignore_sigint(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C reaches the whole process group, but only the main
    process should react (it stops at a step boundary); a worker dying on it would abort
    the loader before the checkpoint is written. Workers still exit with their parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
