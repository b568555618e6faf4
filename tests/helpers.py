"""Small shared test fixtures."""

import torch
from torch import nn

from recalx_lightning import BinnedTemperature, Perturbation


def null_patch_setup(seed: int = 0, n: int = 2):
    """4×4 patches of an 8×8 image (d = 4) whose top-left patch is already the zero baseline: a null feature."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(192, 4))
    x = torch.randn(n, 1, 8, 8)
    x[:, :, :4, :4] = 0
    return model, x, Perturbation.patches(8, patch_size=4, baseline="zeros")


def steep_binned() -> BinnedTemperature:
    """Four bins whose temperature rises steeply with the level."""
    calibrator = BinnedTemperature(4)
    calibrator.set_log_temperatures(torch.tensor([0.0, 0.7, 1.5, 2.5], dtype=torch.float64))
    return calibrator
