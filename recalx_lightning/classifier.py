"""A frozen classifier recalibrated at the exact perturbation level of each input.

``RecalibratedClassifier(model, calibrator, perturbation)(x, keep)`` perturbs ``x`` with the keep matrix,
runs the model once, and divides the logits by the temperature of the keep matrix's exact level::

    p(y | x_S) = softmax( f(x_S) / T(λ(S)) )

Captum explainers perturb the tensor they are given and never tell the forward function which subset was
kept. Inferring λ from the perturbed tensor is wrong whenever a kept feature already equals the baseline
(the black background of a digit) and for blur, noise or per-sample baselines. So we let Captum explain the
0/1 keep vector itself (input all ones, baseline all zeros, one feature per entry) and build the perturbed
input inside the forward (:meth:`RecalibratedClassifier.keep_forward`); the level is then exact by
construction, with the same subsets Captum would have drawn. ``level="effective"`` applies the temperature of
the effective level λ_eff instead (see :mod:`recalx_lightning.perturbation`), from the keep matrix and the
unperturbed input.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from recalx_lightning.calibrators import TemperatureCalibrator
from recalx_lightning.perturbation import LevelKind, Perturbation, check_level

Output = Literal["probs", "log_probs", "logits"]


class RecalibratedClassifier(nn.Module):
    """Wrap a model with a level-dependent temperature; predictions (argmax) never change.

    Args:
        model: maps a batch (n, *S) to logits (n, K); put in eval mode by the caller or here.
        calibrator: a fitted temperature calibrator, or ``None`` for the uncalibrated model.
        perturbation: feature mask and baseline used to perturb inputs.
        output: ``"probs"`` (default), ``"log_probs"`` or ``"logits"`` (scaled logits).
        level: which level the temperature is taken at: ``"paper"`` (λ) or ``"effective"`` (λ_eff).
    """

    def __init__(
        self,
        model: nn.Module,
        calibrator: TemperatureCalibrator | None,
        perturbation: Perturbation,
        output: Output = "probs",
        level: LevelKind = "paper",
    ) -> None:
        super().__init__()
        self.level = check_level(level)
        if output not in ("probs", "log_probs", "logits"):
            raise ValueError(f"`output` must be 'probs', 'log_probs' or 'logits', got {output!r}.")
        self.model = model
        self.calibrator = calibrator
        self.perturbation = perturbation
        self.output = output

    def scaled_logits(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Logits of the perturbed inputs divided by T(λ(keep)): (n, K)."""
        if keep is None:
            logits = self.model(x)
            levels = None
        else:
            logits = self.model(self.perturbation.apply(x, keep))
            informative = self.perturbation.informative_features(x, self.level)
            levels = self.perturbation.level(keep, informative).to(logits.device)
        if self.calibrator is None:
            return logits
        return self.calibrator(logits, levels)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Class probabilities (n, K) of ``x`` perturbed by ``keep`` (n, d); ``keep=None``: unperturbed.

        ``x`` may have batch 1 with many keep rows (one input, many perturbations).
        """
        scaled = self.scaled_logits(x, keep)
        if self.output == "probs":
            return scaled.softmax(-1)
        if self.output == "log_probs":
            return scaled.log_softmax(-1)
        return scaled

    def keep_forward(self, keep: Tensor, x: Tensor) -> Tensor:
        """Captum-facing forward: the keep vectors (m, d) come first, the inputs travel as an extra argument.

        ``x`` has m rows (Captum repeats ``additional_forward_args`` for batched perturbations) or a number
        of rows that divides m (Captum's row order: perturbation-major), e.g. 1.
        """
        rows = keep.shape[0]
        if x.shape[0] != rows:
            if rows % x.shape[0]:
                raise ValueError(f"{rows} keep rows cannot be matched to {x.shape[0]} inputs.")
            x = x.repeat(rows // x.shape[0], *([1] * (x.ndim - 1)))
        return self(x, keep)

    def keep_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs, baselines)`` for Captum when explaining keep vectors: ones and zeros of shape (n, d)."""
        ones = torch.ones(x.shape[0], self.perturbation.num_features, device=x.device, dtype=x.dtype)
        return ones, torch.zeros_like(ones)
