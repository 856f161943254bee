"""Evaluation: trustworthy figures, explanations for any timm model, and a readable report.

Modules: :mod:`~kaedama.evaluate.metrics` (scikit-learn figures),
:mod:`~kaedama.evaluate.calibration` (ECE/MCE, noise floor, temperature),
:mod:`~kaedama.evaluate.leakage` (near-duplicates of training images),
:mod:`~kaedama.evaluate.inference` (the checkpoint's own preprocessing, TTA),
:mod:`~kaedama.evaluate.cam` (CAM / Grad-CAM, target layer from the model),
:mod:`~kaedama.evaluate.latency`, :mod:`~kaedama.evaluate.compare` (McNemar),
:mod:`~kaedama.evaluate.figures` (PNG), :mod:`~kaedama.evaluate.svg` and
:mod:`~kaedama.evaluate.report` (one self-contained HTML page), and
:mod:`~kaedama.evaluate.run`, which ties them together.
``EvaluateConfig`` imports without torch; the rest loads torch when used.
"""

from __future__ import annotations

from kaedama.evaluate.config import EvaluateConfig

__all__ = ["EvaluateConfig"]
