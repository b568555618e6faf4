"""Perturbations: which features exist, what replaces them, and the exact perturbation level.

A perturbation of an input ``x`` keeps a subset S of its d features and replaces the others by a
baseline ``b(x)``::

    x_S = where(keep, x, b(x))                    # keep: (n, d) 0/1, expanded through the feature mask (element_keep)
    λ(S) = (d - |S|) / d                          # share of replaced features (the paper's perturbation level)
    bin(λ) = min(⌊λ·B⌋, B - 1)                    # the level bin whose temperature applies

Levels are computed from the keep matrix, never inferred from pixels: a kept feature that already equals the
baseline (the black background of a digit) still counts as kept.

Two level definitions (``level=`` everywhere a level is used: calibration sampling, fitting, configs,
``explain``, the report):

* ``"paper"`` (default): λ(S) above, ReCalX's definition. Replacing a feature that already equals its baseline
  changes nothing in the input but still raises λ, so the calibrated value ``softmax(f(x_S)/T(λ(S)))`` is not a
  function of the perturbed input alone.
* ``"effective"``: the share of the input's *informative* features that S replaces,

      I(x) = {j : replacing feature j changes at least one element of x}      (:meth:`Perturbation.informative`)
      λ_eff(S; x) = |I(x) ∖ S| / |I(x)|        (= 1 when I(x) is empty: every coalition is then b(x) itself)

  A feature outside I(x) is then an exact null player of the calibrated game. Defined for every baseline; for
  a noise baseline every feature is (almost surely) informative and λ_eff = λ. When every feature of an input
  is informative, λ_eff equals λ bit for bit.

:meth:`Perturbation.informative_features` returns the (n, d) informative mask for ``"effective"`` and ``None``
for ``"paper"``; :meth:`Perturbation.level` turns a keep matrix (and that mask) into levels. Nothing else
computes a level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from recalx_lightning._checks import check_keep, check_positive_int

BaselineSpace = Literal["input", "raw"]
LevelKind = Literal["paper", "effective"]
LEVELS = ("paper", "effective")
_BIN_EPS = 1e-9


def check_level(level: str, name: str = "level") -> str:
    """Raise unless ``level`` is ``"paper"`` or ``"effective"``; return it."""
    if level not in LEVELS:
        raise ValueError(
            f"`{name}` must be 'paper' (share of features replaced, ReCalX) or 'effective' (share of the "
            f"input's informative features replaced), got {level!r}."
        )
    return level


def level_from_counts(kept: Tensor, total: Tensor | int) -> Tensor:
    """The share of ``total`` features that are not ``kept``: ``(total − kept) / total``, float64.

    ``total = 0`` (no feature counts) gives level 1. The one formula behind both level definitions.
    """
    kept = torch.as_tensor(kept).to(torch.float64)
    total = torch.as_tensor(total, device=kept.device).to(torch.float64)
    return torch.where(total > 0, (total - kept) / total.clamp_min(1), torch.ones_like(kept))


def level_to_bin(levels: Tensor, num_bins: int) -> Tensor:
    """Bin index ``min(⌊λ·B⌋, B−1)`` of each level λ, shape (n,) → (n,) int64.

    A tiny tolerance (1e-9) absorbs float round-off so that a level m/d lands in bin ``m·B // d`` exactly
    (valid for d < 10⁸ features).
    """
    scaled = torch.floor(levels.double() * num_bins + _BIN_EPS).long()
    return scaled.clamp_(0, num_bins - 1)


def bin_edges(num_bins: int) -> Tensor:
    """Edges 0, 1/B, ..., 1 of the B equal-width level bins, shape (B + 1,)."""
    return torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)


def subset_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded by (seed, sample index): subsets do not depend on workers or world size."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


# --------------------------------------------------------------------------------------------- baselines
class Baseline:
    """Replacement values ``b(x)`` with the shape of ``x`` (n, C, ...), channels on dim 1.

    Args:
        space: ``"input"``: the baseline is defined in the space of the tensor the model receives (for a
            timm model, *normalised* pixels — zero is then the dataset-mean colour). ``"raw"``: defined in raw
            pixel space; ``x`` is un-normalised with ``mean``/``std`` (per channel) before the baseline is
            computed and the result normalised again, so ``zeros`` means black whatever the model's transform.
        mean, std: per-channel normalisation of the model's input, required for ``space="raw"``.
    """

    name = "baseline"

    def __init__(
        self,
        space: BaselineSpace = "input",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if space not in ("input", "raw"):
            raise ValueError(f"`space` must be 'input' or 'raw', got {space!r}.")
        if space == "raw" and (mean is None or std is None):
            raise ValueError(
                "`space='raw'` needs the model's normalisation: pass `mean` and `std` (per channel), e.g. "
                "from timm's data config, or use `space='input'`."
            )
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"`std` must be positive per channel, got {list(std)}.")
        self.space = space
        self.mean = None if mean is None else torch.tensor(list(mean), dtype=torch.float64)
        self.std = None if std is None else torch.tensor(list(std), dtype=torch.float64)

    def __call__(self, x: Tensor) -> Tensor:
        if self.space == "input":
            return self.compute(x)
        mean, std = (_channel_view(t, x) for t in (self.mean, self.std))
        return (self.compute(x * std + mean) - mean) / std

    def compute(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Baseline in the baseline's own space; shape of ``x``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(space={self.space!r})"


def _channel_view(values: Tensor, x: Tensor) -> Tensor:
    """Reshape per-channel values (C,) to broadcast against x (n, C, ...)."""
    if x.ndim < 2 or values.numel() not in (1, x.shape[1]):
        raise ValueError(
            f"per-channel baseline values have {values.numel()} entries but the input has shape "
            f"{tuple(x.shape)} (channels on dim 1)."
        )
    return values.to(device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))


class ConstantBaseline(Baseline):
    """Every replaced value is ``value`` (``0`` is the paper's zero baseline)."""

    name = "constant"

    def __init__(self, value: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.value = float(value)
        if not math.isfinite(self.value):
            raise ValueError(f"a constant baseline must be a finite number, got {value!r}; e.g. baseline: 0.")

    def compute(self, x: Tensor) -> Tensor:
        return torch.full_like(x, self.value)


class ChannelMeanBaseline(Baseline):
    """Replaced values are a fixed per-channel mean, e.g. of the calibration data (see :meth:`from_data`)."""

    name = "mean"

    def __init__(self, channel_mean: Sequence[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.channel_mean = torch.tensor(list(channel_mean), dtype=torch.float64)
        if self.channel_mean.numel() == 0 or not torch.isfinite(self.channel_mean).all():
            raise ValueError(f"`channel_mean` must be finite per-channel values, got {list(channel_mean)!r}.")

    @classmethod
    def from_data(cls, data: Tensor, **kwargs) -> ChannelMeanBaseline:
        """Per-channel mean of ``data`` (n, C, ...), given in the baseline's space."""
        dims = [0, *range(2, data.ndim)]
        return cls(data.double().mean(dim=dims).tolist(), **kwargs)

    def compute(self, x: Tensor) -> Tensor:
        return _channel_view(self.channel_mean, x).expand_as(x).clone()


class BlurBaseline(Baseline):
    """A Gaussian blur of the input itself (per channel, reflect padding); needs (n, C, H, W) inputs."""

    name = "blur"

    def __init__(self, sigma: float = 5.0, kernel_size: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if sigma <= 0:
            raise ValueError(f"`sigma` of the blur baseline must be > 0, got {sigma}.")
        self.sigma = float(sigma)
        self.kernel_size = kernel_size or 2 * math.ceil(3 * sigma) + 1
        if self.kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd, got {self.kernel_size}.")

    def compute(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"the blur baseline needs images of shape (n, C, H, W), got {tuple(x.shape)}.")
        radius = self.kernel_size // 2
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets / self.sigma) ** 2)
        kernel = kernel / kernel.sum()
        n, c, h, w = x.shape
        pad_h, pad_w = min(radius, h - 1), min(radius, w - 1)
        out = x.reshape(n * c, 1, h, w)
        k_h = kernel[radius - pad_h : radius + pad_h + 1]
        k_w = kernel[radius - pad_w : radius + pad_w + 1]
        out = F.conv2d(F.pad(out, (0, 0, pad_h, pad_h), mode="reflect"), (k_h / k_h.sum()).view(1, 1, -1, 1))
        out = F.conv2d(F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect"), (k_w / k_w.sum()).view(1, 1, 1, -1))
        return out.reshape(n, c, h, w)


class NoiseBaseline(Baseline):
    """Replaced values are seeded noise, fixed per (seed, input shape): the same for every call and sample.

    Args:
        distribution: ``"gaussian"`` (``loc`` ± ``scale``) or ``"uniform"`` (in [``low``, ``high``]).
        seed: the noise pattern's seed; drawn on the CPU so that it is identical on every device.
    """

    name = "noise"

    def __init__(
        self,
        distribution: Literal["gaussian", "uniform"] = "gaussian",
        loc: float = 0.0,
        scale: float = 1.0,
        low: float = 0.0,
        high: float = 1.0,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if distribution not in ("gaussian", "uniform"):
            raise ValueError(f"`distribution` must be 'gaussian' or 'uniform', got {distribution!r}.")
        if distribution == "gaussian" and scale <= 0:
            raise ValueError(f"`scale` of the Gaussian noise baseline must be > 0, got {scale}.")
        if distribution == "uniform" and not low < high:
            raise ValueError(f"the uniform noise baseline needs `low` < `high`, got [{low}, {high}].")
        self.distribution, self.seed = distribution, int(seed)
        self.loc, self.scale, self.low, self.high = float(loc), float(scale), float(low), float(high)

    def compute(self, x: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        if self.distribution == "gaussian":
            noise = torch.randn(x.shape[1:], generator=generator, dtype=torch.float64) * self.scale + self.loc
        else:
            noise = torch.rand(x.shape[1:], generator=generator, dtype=torch.float64)
            noise = noise * (self.high - self.low) + self.low
        return noise.to(device=x.device, dtype=x.dtype).expand_as(x).clone()


BASELINES: dict[str, type[Baseline]] = {
    "zeros": ConstantBaseline,
    "constant": ConstantBaseline,
    "mean": ChannelMeanBaseline,
    "blur": BlurBaseline,
    "gaussian": NoiseBaseline,
    "uniform": NoiseBaseline,
}


def make_baseline(spec: str | float | Baseline = "zeros", **kwargs) -> Baseline:
    """Build a baseline from a name (``zeros``, ``constant``, ``mean``, ``blur``, ``gaussian``, ``uniform``),
    a number (a constant) or pass a :class:`Baseline` through; ``kwargs`` go to its constructor."""
    if isinstance(spec, Baseline):
        return spec
    if isinstance(spec, str) and _is_number(spec):  # a constant given on the command line
        spec = float(spec)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ConstantBaseline(float(spec), **kwargs)
    if spec not in BASELINES:
        raise ValueError(f"unknown baseline {spec!r}; choose one of {sorted(BASELINES)} or a number.")
    if spec in ("gaussian", "uniform"):
        kwargs.setdefault("distribution", spec)
    if spec == "zeros":
        kwargs.setdefault("value", 0.0)
    try:
        return BASELINES[spec](**kwargs)
    except TypeError as error:
        detail = str(error).partition("__init__() ")[2] or str(error)
        hint = " (per-channel values, e.g. [0.485, 0.456, 0.406])" if spec == "mean" else ""
        fix = ("set it in `baseline_kwargs`" if "missing" in detail
               else f"check `baseline_kwargs` against {BASELINES[spec].__name__}")
        raise ValueError(f"baseline {spec!r}: {detail}{hint}; {fix}.") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------ feature masks
def patch_mask(
    image_size: int | Sequence[int],
    patch_size: int | Sequence[int] | None = None,
    grid: int | Sequence[int] | None = None,
) -> Tensor:
    """Integer mask (H, W) of a grid of rectangular patches, ids row-major from 0.

    Give either ``patch_size`` (edge patches are smaller when it does not divide H or W) or ``grid``
    (rows, cols) — e.g. a ViT's ``model.patch_embed.grid_size``; patch boundaries are then ⌊i·rows/H⌋.
    """
    h, w = _pair(image_size, "image_size")
    if (patch_size is None) == (grid is None):
        raise ValueError("give exactly one of `patch_size` or `grid` for a patch feature mask.")
    if patch_size is not None:
        ph, pw = _pair(patch_size, "patch_size")
        rows, cols = torch.arange(h) // ph, torch.arange(w) // pw
        n_cols = math.ceil(w / pw)
    else:
        gh, gw = _pair(grid, "grid")
        if gh > h or gw > w:
            raise ValueError(f"`grid` {gh}×{gw} is finer than the image {h}×{w}.")
        rows, cols = torch.arange(h) * gh // h, torch.arange(w) * gw // w
        n_cols = gw
    return rows[:, None] * n_cols + cols[None, :]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"`{name}` must be a positive int or a pair of positive ints, got {value!r}.")
    return pair  # type: ignore[return-value]


def validate_feature_mask(feature_mask: Tensor) -> int:
    """Check that ids are integers exactly 0..d−1 (no gaps); return d."""
    if not isinstance(feature_mask, Tensor) or feature_mask.is_floating_point() or feature_mask.is_complex():
        raise ValueError("`feature_mask` must be an integer tensor of feature ids 0..d-1.")
    if feature_mask.numel() == 0:
        raise ValueError("`feature_mask` is empty.")
    ids = torch.unique(feature_mask)
    d = ids.numel()
    if ids[0] != 0 or ids[-1] != d - 1:
        missing = sorted(set(range(int(ids[-1]) + 1)) - set(ids.tolist()))[:10]
        raise ValueError(
            f"`feature_mask` ids must be exactly 0..d-1 with no gaps; found {d} distinct ids in "
            f"[{int(ids[0])}, {int(ids[-1])}]" + (f", missing {missing}" if missing else "")
            + ". Relabel with `torch.unique(mask, return_inverse=True)[1]`."
        )
    return d


def _counts_per_bin(total: int, num_bins: int) -> list[Tensor]:
    """For each of ``num_bins`` bins, the counts m ∈ 0..total of replaced features with level m/total in it."""
    counts = torch.arange(total + 1)
    bins = torch.clamp(counts * num_bins // max(total, 1), max=num_bins - 1)
    return [counts[bins == b] for b in range(num_bins)]


# ------------------------------------------------------------------------------------------- perturbation
class Perturbation:
    """Feature grouping + baseline: perturbed inputs, exact levels and level-bin subset sampling.

    Args:
        feature_mask: integer ids 0..d−1, shape broadcastable to one input (e.g. (H, W) for (C, H, W) images).
        baseline: a :class:`Baseline`, a name for :func:`make_baseline` or a number.

    Build the usual masks with :meth:`patches`, :meth:`pixels` or :meth:`tabular`.
    """

    def __init__(self, feature_mask: Tensor, baseline: str | float | Baseline = "zeros") -> None:
        self.num_features = validate_feature_mask(feature_mask)
        self.feature_mask = feature_mask.long()
        self._device_mask: tuple[Tensor, Tensor] | None = None
        self.baseline = make_baseline(baseline)

    # constructors -----------------------------------------------------------------------------------
    @classmethod
    def patches(
        cls,
        image_size: int | Sequence[int],
        patch_size: int | Sequence[int] | None = None,
        grid: int | Sequence[int] | None = None,
        baseline: str | float | Baseline = "zeros",
    ) -> Perturbation:
        """Rectangular patches of an (H, W) image (all channels of a patch form one feature)."""
        return cls(patch_mask(image_size, patch_size=patch_size, grid=grid), baseline)

    @classmethod
    def pixels(cls, image_size: int | Sequence[int], baseline: str | float | Baseline = "zeros") -> Perturbation:
        """One feature per pixel (all channels of a pixel together)."""
        h, w = _pair(image_size, "image_size")
        return cls(torch.arange(h * w).view(h, w), baseline)

    @classmethod
    def tabular(cls, num_features: int, baseline: str | float | Baseline = "zeros") -> Perturbation:
        """One feature per column of (n, F) tabular inputs."""
        check_positive_int(num_features, "num_features")
        return cls(torch.arange(num_features), baseline)

    # core -------------------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise if the feature mask cannot broadcast to one input ``x[0]``."""
        sample_shape = tuple(x.shape[1:])
        mask_shape = tuple(self.feature_mask.shape)
        if len(mask_shape) > len(sample_shape) or any(
            m not in (1, s) for m, s in zip(reversed(mask_shape), reversed(sample_shape))
        ):
            raise ValueError(
                f"`feature_mask` of shape {mask_shape} does not fit inputs of shape {sample_shape} "
                "(batch dimension excluded); it must match the input's trailing dimensions, e.g. (H, W) "
                "for (C, H, W) images."
            )

    def apply(self, x: Tensor, keep: Tensor) -> Tensor:
        """Perturbed inputs ``where(keep, x, b(x))``.

        Args:
            x: inputs (n, *S), or (1, *S) to perturb one input in many ways.
            keep: (n, d) or (m, d) with x of batch 1; 1 keeps a feature, 0 replaces it by the baseline.
        Returns:
            (max(n, m), *S) on ``x``'s device and dtype.
        """
        check_keep(keep, self.num_features)
        self.check_input(x)
        if x.shape[0] not in (1, keep.shape[0]):
            raise ValueError(
                f"`x` has batch {x.shape[0]} but `keep` has {keep.shape[0]} rows; use equal sizes or a batch of 1."
            )
        keep_elements = self.element_keep(keep.to(x.device), x.ndim - 1)
        if not x.is_floating_point():
            exact = self.baseline(x.double())
            fractional = exact[exact != exact.round()]
            if fractional.numel():
                raise ValueError(
                    f"`x` has integer dtype {x.dtype} but the baseline {self.baseline!r} has fractional values "
                    f"(e.g. {float(fractional[0]):.4g}) that would be rounded; convert the inputs to float first "
                    "(e.g. x.float() / 255)."
                )
            return torch.where(keep_elements, x, exact.to(x.dtype))
        return torch.where(keep_elements, x, self.baseline(x))

    def element_keep(
        self,
        keep: Tensor,
        sample_ndim: int | None = None,
        dtype: torch.dtype = torch.bool,
        buffer: Tensor | None = None,
    ) -> Tensor:
        """Keep rows expanded through the feature mask to the elements of one input, on ``keep``'s device.

        Args:
            keep: (m, d) keep rows (not validated: see :meth:`apply` for a checked caller).
            sample_ndim: dimensions of one input (``x.ndim - 1``); size-1 dimensions are put before the mask's
                so that the result broadcasts against (m, *S), e.g. over the channels of (C, H, W) images.
                Default: the mask's dimensions.
            dtype: ``torch.bool`` for ``where(keep, x, b)``, or the inputs' floating dtype for
                ``b + (x − b)·keep``.
            buffer: optional flat tensor of ``dtype`` with at least m·``feature_mask.numel()`` elements, on
                ``keep``'s device, reused across calls; the result is then a view of its first elements.
        Returns:
            (m, 1, …, 1, *feature_mask.shape) of ``dtype``: element e of row i is ``keep[i, feature_mask[e]]``.
        """
        mask = self._mask_on(keep.device)
        pad = [1] * ((mask.ndim if sample_ndim is None else sample_ndim) - mask.ndim)
        rows = keep.to(dtype)
        if buffer is None:
            elements = rows.index_select(1, mask.flatten())
        else:
            elements = buffer[: keep.shape[0] * mask.numel()].view(keep.shape[0], -1)
            torch.index_select(rows, 1, mask.flatten(), out=elements)
        return elements.view(keep.shape[0], *pad, *mask.shape)

    def _mask_on(self, device: torch.device) -> Tensor:
        """The feature mask on ``device``, copied there once rather than once per batch."""
        if self.feature_mask.device == device:
            return self.feature_mask
        cached = getattr(self, "_device_mask", None)
        if cached is None or cached[0] is not self.feature_mask or cached[1].device != device:
            cached = self._device_mask = (self.feature_mask, self.feature_mask.to(device))
        return cached[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_device_mask": None}

    def level(self, keep: Tensor, informative: Tensor | None = None) -> Tensor:
        """Exact perturbation level of each keep row, (n, d) → (n,) float64.

        Args:
            keep: (n, d) 0/1 keep rows.
            informative: ``None`` for the paper's level λ = (d − |S|)/d; or the informative mask of the
                inputs (from :meth:`informative_features`), (n, d) or (1, d) bool, for the effective level
                λ_eff = |I ∖ S| / |I| (1 where no feature is informative).
        """
        check_keep(keep, self.num_features)
        if informative is None:
            return level_from_counts(keep.to(torch.float64).sum(1), self.num_features)
        informative = informative.to(device=keep.device, dtype=torch.bool)
        if informative.ndim != 2 or informative.shape[1] != self.num_features or informative.shape[0] not in (
            1, keep.shape[0]
        ):
            raise ValueError(
                f"`informative` must be (n, {self.num_features}) or (1, {self.num_features}) bool for "
                f"{keep.shape[0]} keep rows, got {tuple(informative.shape)}."
            )
        kept = (keep.to(torch.bool) & informative).to(torch.float64).sum(1)
        return level_from_counts(kept, informative.to(torch.float64).sum(1).expand_as(kept))

    def informative(self, x: Tensor) -> Tensor:
        """(n, d) bool: True where replacing feature j of input i by the baseline changes at least one element.

        Computed from ``x`` and ``b(x)`` exactly (no tolerance); for noise or blur baselines nearly every
        feature is informative, for the zero baseline the all-black patches of a digit are not.
        """
        self.check_input(x)
        mask = self._mask_on(x.device)
        differs = x != self.baseline(x)
        # reduce the leading sample dimensions that the mask broadcasts over (e.g. channels)
        lead = differs.ndim - 1 - mask.ndim
        if lead:
            differs = differs.any(dim=tuple(range(1, 1 + lead)))
        index = mask.expand(differs.shape[1:]).flatten()
        differs = differs.reshape(x.shape[0], -1)
        counts = torch.zeros(x.shape[0], self.num_features, device=x.device, dtype=torch.int64)
        return counts.index_add_(1, index, differs.to(torch.int64)) > 0

    def informative_features(self, x: Tensor, level: LevelKind = "paper") -> Tensor | None:
        """The informative mask (n, d) that :meth:`level` needs for ``level="effective"``; ``None`` for "paper"."""
        check_level(level)
        return self.informative(x) if level == "effective" else None

    def to_pixels(self, attributions: Tensor) -> Tensor:
        """Spread per-feature values (n, d) onto the feature mask: (n, *feature_mask.shape)."""
        if attributions.ndim != 2 or attributions.shape[1] != self.num_features:
            raise ValueError(f"expected (n, {self.num_features}) per-feature values, got {tuple(attributions.shape)}.")
        mask = self._mask_on(attributions.device)
        return attributions[:, mask]

    # sampling ---------------------------------------------------------------------------------------
    def masked_counts(self, num_bins: int) -> list[Tensor]:
        """For each bin, the numbers m of replaced features whose level m/d falls into it (exact integers).

        Raises when some bin holds no level (d too small for B bins).
        """
        check_positive_int(num_bins, "num_bins")
        d = self.num_features
        per_bin = _counts_per_bin(d, num_bins)
        empty = [b for b, c in enumerate(per_bin) if c.numel() == 0]
        if empty:
            raise ValueError(
                f"with d = {d} features the levels m/d cannot fill {num_bins} bins: bins {empty} hold no "
                f"level. Use `num_bins` <= {d} or a finer feature mask (more features)."
            )
        return per_bin

    def sample_keep(
        self,
        num_samples: int,
        bin_index: int,
        num_bins: int,
        generator: torch.Generator | None = None,
        informative: Tensor | None = None,
    ) -> Tensor:
        """Random keep rows (num_samples, d) bool with levels in bin ``bin_index`` of ``num_bins``.

        Paper level (``informative=None``): the number of replaced features is uniform over the integer
        levels inside the bin; given that number, the replaced subset is uniform.

        Effective level (``informative``: the (d,) informative mask of *one* input, m = its number of
        informative features): the number r of replaced informative features is uniform over the integers with
        λ_eff = r/m inside the bin, the replaced informative subset uniform given r; the uninformative features
        (which change nothing) are replaced in a uniform number 0..d−m, uniform subset. An input with fewer
        informative features than bins cannot reach every bin: a bin that holds no level r/m gets the r whose
        level is nearest the bin's centre (its rows land in a neighbouring bin, with their exact level), so
        bins are filled by the inputs that can reach them; an input with no informative feature (it equals its
        baseline) has λ_eff = 1 for every row. When every feature is informative the draws are the paper
        level's, bit for bit. Draws come from ``generator`` (CPU) only.
        """
        if not 0 <= bin_index < num_bins:
            raise ValueError(f"`bin_index` must be in [0, {num_bins}), got {bin_index}.")
        d = self.num_features
        if informative is not None:
            informative = informative.reshape(-1).to(device="cpu", dtype=torch.bool)
            if informative.numel() != d:
                raise ValueError(f"`informative` must hold one flag per feature ({d}), got {informative.numel()}.")
        if informative is None or bool(informative.all()):
            candidates = self.masked_counts(num_bins)[bin_index]
            choice = torch.randint(candidates.numel(), (num_samples,), generator=generator)
            num_masked = candidates[choice]
            ranks = torch.rand(num_samples, d, generator=generator).argsort(1)
            return ranks >= num_masked[:, None]
        useful, useless = torch.nonzero(informative).flatten(), torch.nonzero(~informative).flatten()
        m = useful.numel()
        candidates = _counts_per_bin(m, num_bins)[bin_index] if m else torch.zeros(0, dtype=torch.long)
        if candidates.numel() == 0:
            reachable = torch.arange(m + 1)
            centre = (bin_index + 0.5) / num_bins
            candidates = reachable[(level_from_counts(m - reachable, m) - centre).abs().argmin()].reshape(1)
        choice = torch.randint(candidates.numel(), (num_samples,), generator=generator)
        num_masked = candidates[choice]
        keep = torch.ones(num_samples, d, dtype=torch.bool)
        keep[:, useful] = torch.rand(num_samples, m, generator=generator).argsort(1) >= num_masked[:, None]
        others = torch.randint(d - m + 1, (num_samples,), generator=generator)
        keep[:, useless] = torch.rand(num_samples, d - m, generator=generator).argsort(1) >= others[:, None]
        return keep

    def __repr__(self) -> str:
        return (
            f"Perturbation(num_features={self.num_features}, mask_shape={tuple(self.feature_mask.shape)}, "
            f"baseline={self.baseline!r})"
        )
