"""Temperature calibrators: scaled logits ``z / T(λ)`` for a perturbation level λ.

=====================  ======================================================================  ==============
calibrator             temperature                                                              parameters
=====================  ======================================================================  ==============
``GlobalTemperature``  one T for every level (classic temperature scaling, "Calibrate to        1
                       Interpret", Scafarto et al. 2022)
``BinnedTemperature``  ReCalX_TS (Decker et al. 2025): T_b for bin b = min(⌊λ·B⌋, B−1)          B
``SmoothTemperature``  log T piecewise linear in λ between bin centres (b + ½)/B, flat beyond    B
                       the outer centres: continuous in λ, so a Shapley value integrates no
                       jumps at bin edges
=====================  ======================================================================  ==============

All are parametrised by θ = log T (float64), so a temperature is always positive and the argmax of the
logits never changes; T is bounded to [``min_temperature``, ``max_temperature``] (default [0.05, 100]).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from recalx_lightning._checks import check_levels, check_logits, check_positive_int
from recalx_lightning.perturbation import level_to_bin


class TemperatureCalibrator(nn.Module):
    """Base class: ``forward(logits (n, K), levels (n,)) -> logits / T(levels)`` of shape (n, K).

    Subclasses define :meth:`log_temperature_at` (differentiable in θ). Those whose temperature is constant
    on groups of levels (``separable = True``) also define :meth:`group_index`, which lets
    :func:`~recalx_lightning.fitting.fit_temperatures` solve each group exactly and independently.
    """

    separable: bool = True
    kind: str = "base"

    def __init__(self, num_params: int, min_temperature: float = 0.05, max_temperature: float = 100.0) -> None:
        super().__init__()
        check_positive_int(num_params, "num_bins")
        if not (0 < min_temperature < max_temperature < float("inf")):
            raise ValueError(
                "temperature bounds must satisfy 0 < min_temperature < max_temperature < inf; got "
                f"min_temperature={min_temperature}, max_temperature={max_temperature}."
            )
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.log_temperature = nn.Parameter(torch.zeros(num_params, dtype=torch.float64))

    @property
    def num_bins(self) -> int:
        """Number of temperature parameters (1 for :class:`GlobalTemperature`)."""
        return self.log_temperature.numel()

    @property
    def temperatures(self) -> Tensor:
        """The temperatures T = exp(θ), shape (num_bins,), detached float64."""
        return self.log_temperature.detach().exp()

    def group_index(self, levels: Tensor) -> Tensor:
        """Index of the temperature parameter used at each level, (n,) → (n,) int64."""
        raise NotImplementedError(f"{type(self).__name__} is not piecewise constant in λ.")

    def log_temperature_at(self, levels: Tensor, theta: Tensor | None = None) -> Tensor:
        """θ(λ) = log T at each level, (n,) → (n,) float64, differentiable in θ.

        ``theta`` (num_bins,) replaces the stored parameters (used by the fitting solvers).
        """
        theta = self.log_temperature if theta is None else theta
        return theta[self.group_index(levels.to(theta.device))]

    def temperature(self, levels: Tensor) -> Tensor:
        """T(λ) at each level, (n,) → (n,) float64."""
        return self.log_temperature_at(levels).exp()

    def forward(self, logits: Tensor, levels: Tensor | None = None) -> Tensor:
        """Scaled logits (n, K) = logits / T(levels); ``levels=None`` means unperturbed inputs (λ = 0)."""
        if logits.ndim != 2:
            raise ValueError(f"`logits` must have shape (n, K), got {tuple(logits.shape)}.")
        if levels is None:
            levels = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
        else:
            check_levels(levels, logits.shape[0])
        temperature = self.temperature(levels).to(device=logits.device, dtype=logits.dtype)
        return apply_temperature(logits, temperature)

    @torch.no_grad()
    def set_log_temperatures(
        self, values: Tensor, warn_on_bounds: bool = True, baseline_bins: Sequence[int] = ()
    ) -> list[int]:
        """Write θ (num_bins,) clamped into the bounds; warn naming each bin that hit a bound. Returns those bins.

        Raises on a wrong length or a non-finite entry: a NaN temperature would flow into every explanation.
        ``baseline_bins``: bins holding all-baseline inputs (λ = 1), where only the class prior can be learned, so
        T → ∞ is expected there (the warning says so).
        """
        values = torch.as_tensor(values).detach().to(torch.float64).cpu()
        if values.shape != (self.num_bins,):
            raise ValueError(
                f"{type(self).__name__} has {self.num_bins} temperatures but got log-temperatures of shape "
                f"{tuple(values.shape)}; build the calibrator with num_bins={values.numel()} or pass "
                f"{self.num_bins} values."
            )
        if not torch.isfinite(values).all():
            bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
            raise ValueError(
                f"{type(self).__name__}: log-temperatures of bins {bad} are not finite ({values[bad].tolist()}); "
                "refit the temperatures (a NaN temperature makes every explanation NaN)."
            )
        low, high = torch.tensor([self.min_temperature, self.max_temperature], dtype=torch.float64).log()
        clamped = values.clamp(low, high)
        hits = torch.nonzero((values <= low + 1e-9) | (values >= high - 1e-9)).flatten().tolist()
        with torch.inference_mode(False):
            self.log_temperature.data = clamped.to(self.log_temperature.device).clone()
        if hits and warn_on_bounds:
            warnings.warn(self._bound_message(hits, clamped, set(baseline_bins)), UserWarning, stacklevel=3)
        return hits

    def _bound_message(self, hits: list[int], clamped: Tensor, baseline_bins: set[int]) -> str:
        detail = ", ".join(f"bin {b}: T = {float(clamped[b].exp()):.4g}" for b in hits)
        bounds = f"[{self.min_temperature}, {self.max_temperature}]"
        message = f"{type(self).__name__}: temperature hit a bound {bounds} in {detail}."
        expected = [b for b in hits if b in baseline_bins and clamped[b] > 0]
        others = [b for b in hits if b not in expected]
        if expected:
            message += (
                f" Expected in bins {expected}: they hold all-baseline inputs (λ = 1), where only the class prior "
                "can be learned, so T → ∞ there."
            )
        if others:
            message += (
                f" Bins {others}: a perfectly classified bin drives T to 0, a bin whose inputs are all the same "
                "drives T to ∞; check those bins' data or widen the bounds."
            )
        return message

    # persistence ------------------------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor arguments that rebuild this calibrator (see :func:`load_calibrator`)."""
        return {
            "num_bins": self.num_bins,
            "min_temperature": self.min_temperature,
            "max_temperature": self.max_temperature,
        }

    def save(self, path: str | Path) -> Path:
        """Write a small file (kind, config, θ) readable by :func:`load_calibrator` without Lightning."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"kind": self.kind, "config": self.config(), "log_temperature": self.log_temperature.detach().cpu()}
        torch.save(payload, path)
        return path

    def extra_repr(self) -> str:
        temps = ", ".join(f"{t:.3g}" for t in self.temperatures.tolist())
        return f"T=[{temps}], bounds=[{self.min_temperature}, {self.max_temperature}]"


class GlobalTemperature(TemperatureCalibrator):
    """One temperature for every perturbation level (classic temperature scaling)."""

    kind = "global"

    def __init__(self, min_temperature: float = 0.05, max_temperature: float = 100.0) -> None:
        super().__init__(1, min_temperature, max_temperature)

    def group_index(self, levels: Tensor) -> Tensor:
        return torch.zeros(levels.shape[0], dtype=torch.long, device=levels.device)

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("num_bins")
        return cfg


class BinnedTemperature(TemperatureCalibrator):
    """ReCalX_TS: one temperature per level bin, bin b = min(⌊λ·B⌋, B−1) (default B = 10)."""

    kind = "binned"

    def __init__(self, num_bins: int = 10, min_temperature: float = 0.05, max_temperature: float = 100.0) -> None:
        super().__init__(num_bins, min_temperature, max_temperature)

    def group_index(self, levels: Tensor) -> Tensor:
        return level_to_bin(levels, self.num_bins)


class SmoothTemperature(TemperatureCalibrator):
    """log T piecewise linear in λ through the bin centres c_b = (b + ½)/B, constant outside [c_0, c_{B−1}]."""

    kind = "smooth"
    separable = False

    def __init__(self, num_bins: int = 10, min_temperature: float = 0.05, max_temperature: float = 100.0) -> None:
        super().__init__(num_bins, min_temperature, max_temperature)

    def interpolation(self, levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Lower centre index, upper centre index and weight w of the upper one, each (n,)."""
        num_bins = self.num_bins
        position = (levels.double() * num_bins - 0.5).clamp(0, num_bins - 1)
        lower = position.floor().long().clamp(max=max(num_bins - 2, 0))
        upper = (lower + 1).clamp(max=num_bins - 1)
        return lower, upper, position - lower

    def log_temperature_at(self, levels: Tensor, theta: Tensor | None = None) -> Tensor:
        theta = self.log_temperature if theta is None else theta
        lower, upper, weight = self.interpolation(levels.to(theta.device))
        return theta[lower] * (1 - weight) + theta[upper] * weight


CALIBRATORS: dict[str, type[TemperatureCalibrator]] = {
    "global": GlobalTemperature,
    "binned": BinnedTemperature,
    "smooth": SmoothTemperature,
}


def make_calibrator(kind: str = "binned", **kwargs) -> TemperatureCalibrator:
    """Build a calibrator by name: ``binned`` (ReCalX, default), ``smooth`` or ``global``."""
    if kind not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {kind!r}; choose one of {sorted(CALIBRATORS)}.")
    if kind == "global":
        kwargs.pop("num_bins", None)
    return CALIBRATORS[kind](**kwargs)


def load_calibrator(path: str | Path, map_location: str | torch.device = "cpu") -> TemperatureCalibrator:
    """Load a calibrator written by :meth:`TemperatureCalibrator.save`, or the main calibrator of a ReCalXModule
    checkpoint (no Lightning needed)."""
    from recalx_lightning.checkpoints import read_weights_only

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibrator file at {str(path)!r}; a fit run writes <log_dir>/calibrator.pt.")
    payload = read_weights_only(path, "calibrator file", map_location)
    if isinstance(payload, dict) and "state_dict" in payload and "hyper_parameters" in payload:
        payload = _from_checkpoint(payload, path)
    if not isinstance(payload, dict) or not {"kind", "config", "log_temperature"} <= payload.keys():
        raise ValueError(
            f"{str(path)!r} is neither a calibrator file (TemperatureCalibrator.save, a run's calibrator.pt) nor "
            "a ReCalX Lightning checkpoint."
        )
    kind, config, values = payload["kind"], payload["config"], payload["log_temperature"]
    if kind not in CALIBRATORS or not isinstance(config, dict) or not isinstance(values, Tensor):
        raise ValueError(
            f"calibrator file {str(path)!r} is malformed (kind {kind!r}, config {type(config).__name__}, "
            f"log_temperature {type(values).__name__}); re-export it with TemperatureCalibrator.save."
        )
    try:
        calibrator = make_calibrator(kind, **config)
        calibrator.set_log_temperatures(values, warn_on_bounds=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"calibrator file {str(path)!r} is invalid: {err}") from None
    return calibrator


def _from_checkpoint(checkpoint: dict, path: Path) -> dict:
    """The main calibrator of a ReCalXModule checkpoint, in :meth:`TemperatureCalibrator.save`'s format."""
    hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
    kind = hparams.get("calibrator") if isinstance(hparams, dict) else None
    key = f"calibrators.{kind}.log_temperature"
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"checkpoint {str(path)!r} holds no temperatures for calibrator {kind!r}.")
    bounds = {k: hparams[k] for k in ("min_temperature", "max_temperature") if k in hparams}
    config = bounds if kind == "global" else {"num_bins": hparams.get("num_bins", 10), **bounds}
    return {"kind": kind, "config": config, "log_temperature": checkpoint["state_dict"][key]}


def apply_temperature(logits: Tensor, temperature: Tensor | float) -> Tensor:
    """``logits / T``: logits (n, K), temperature (n,) one per row or a scalar; torch's type promotion applies
    (float64 temperatures on float32 logits give float64). The one place a temperature is applied."""
    temperature = torch.as_tensor(temperature, device=logits.device)
    return logits / (temperature[:, None] if temperature.ndim == 1 else temperature)


def scale_logits(logits: Tensor, levels: Tensor | None, calibrator: TemperatureCalibrator | None) -> Tensor:
    """``calibrator(logits, levels)``, or the logits unchanged when ``calibrator`` is None (uncalibrated)."""
    check_logits(logits)
    return logits if calibrator is None else calibrator(logits, levels)
