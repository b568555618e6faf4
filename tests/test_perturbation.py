"""Perturbation: feature masks, baselines, exact levels and level-bin sampling."""

import pytest
import torch

from recalx_lightning import Perturbation, make_baseline
from recalx_lightning.perturbation import (
    BlurBaseline,
    ChannelMeanBaseline,
    NoiseBaseline,
    level_to_bin,
    patch_mask,
    subset_generator,
)


def naive_apply(x, keep, mask, baseline):
    """Element-by-element oracle: a pixel keeps x when its feature is kept."""
    out = torch.empty(keep.shape[0], *x.shape[1:])
    b = baseline(x)
    for r in range(keep.shape[0]):
        src = x[0] if x.shape[0] == 1 else x[r]
        bs = b[0] if b.shape[0] == 1 else b[r]
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape[1:]]):
            idx = tuple(idx.tolist())
            feature = mask[idx[-mask.ndim :]] if mask.ndim else mask
            out[(r, *idx)] = src[idx] if keep[r, feature] else bs[idx]
    return out


def test_patch_mask_by_size_and_grid():
    mask = patch_mask((4, 6), patch_size=2)
    assert mask.tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    uneven = patch_mask((5, 5), patch_size=2)  # edge patches are smaller
    assert uneven.max() == 8 and uneven[4, 4] == 8 and uneven[0, 4] == 2
    assert torch.equal(patch_mask((4, 6), grid=(2, 3)), mask)
    vit_grid = patch_mask(224, grid=(14, 14))
    assert vit_grid.shape == (224, 224) and vit_grid.unique().numel() == 196
    assert (vit_grid[:16, :16] == 0).all() and vit_grid[16, 16] == 15


def test_apply_matches_elementwise_oracle():
    perturbation = Perturbation.patches((4, 4), patch_size=2, baseline=0.5)
    x = torch.randn(3, 2, 4, 4)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    expected = naive_apply(x, keep, perturbation.feature_mask, perturbation.baseline)
    assert torch.equal(perturbation.apply(x, keep), expected)
    # one input, many perturbations
    many = perturbation.apply(x[:1], keep)
    assert torch.equal(many, naive_apply(x[:1], keep, perturbation.feature_mask, perturbation.baseline))


def test_element_keep_matches_indexing_oracle_with_and_without_buffer():
    perturbation = Perturbation.patches((4, 6), patch_size=(2, 3))
    mask = perturbation.feature_mask
    keep = torch.rand(5, perturbation.num_features, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = torch.stack([row[mask] for row in keep])  # element (h, w) of row i is keep[i, mask[h, w]]
    assert torch.equal(perturbation.element_keep(keep), expected)
    padded = perturbation.element_keep(keep, sample_ndim=3)
    assert padded.shape == (5, 1, 4, 6) and torch.equal(padded[:, 0], expected)
    buffer = torch.full((7 * mask.numel(),), 9.0, dtype=torch.float64)
    reused = perturbation.element_keep(keep, 3, torch.float64, buffer=buffer)
    assert reused.dtype == torch.float64 and torch.equal(reused[:, 0], expected.double())
    assert reused.data_ptr() == buffer.data_ptr() and buffer[5 * mask.numel():].eq(9.0).all()

def test_tabular_and_custom_masks():
    tab = Perturbation.tabular(3)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert tab.apply(x, torch.tensor([[1, 0, 1]])).tolist() == [[1.0, 0.0, 3.0]]
    custom = Perturbation(torch.tensor([[0, 1], [1, 2]]))
    assert custom.num_features == 3
    per_channel = Perturbation(torch.arange(2).view(2, 1, 1))  # one feature per channel
    img = torch.ones(1, 2, 3, 3)
    out = per_channel.apply(img, torch.tensor([[1, 0]]))
    assert out[0, 0].eq(1).all() and out[0, 1].eq(0).all()


def test_exact_levels_when_kept_features_equal_the_baseline():
    """A black (= baseline) background patch that is kept still counts as kept."""
    perturbation = Perturbation.patches((4, 4), patch_size=2)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, :2, :2] = 1.0  # only patch 0 differs from the zero baseline
    keep = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]])
    assert perturbation.level(keep).tolist() == [0.25, 0.75, 0.25]
    perturbed = perturbation.apply(x, keep)
    assert torch.equal(perturbed[0], x[0]) and torch.equal(perturbed[2], torch.zeros(1, 4, 4))


def test_levels_are_exact_fractions_and_bins():
    perturbation = Perturbation.tabular(10)
    keep = torch.ones(11, 10, dtype=torch.bool)
    for m in range(11):
        keep[m, :m] = False
    levels = perturbation.level(keep)
    assert levels.dtype == torch.float64
    assert torch.equal(levels, torch.arange(11, dtype=torch.float64) / 10)
    assert level_to_bin(levels, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    for d in (3, 7, 49, 196, 1000):
        m = torch.arange(d + 1)
        exact = torch.clamp(m * 10 // d, max=9)
        assert torch.equal(level_to_bin(m.double() / d, 10), exact)


def test_sampling_stays_in_bin_uniform_counts_and_is_seeded():
    perturbation = Perturbation.patches((8, 8), patch_size=2)  # d = 16
    for b in range(10):
        keep = perturbation.sample_keep(400, b, 10, subset_generator(0, b))
        assert (level_to_bin(perturbation.level(keep), 10) == b).all()
    keep = perturbation.sample_keep(6000, 5, 10, torch.Generator().manual_seed(1))
    masked = (~keep).sum(1)
    assert set(masked.tolist()) == {8, 9}  # levels 8/16 and 9/16 are bin 5
    assert abs((masked == 8).double().mean().item() - 0.5) < 0.03
    per_feature = (~keep).double().mean(0)  # subset uniform given size: each feature equally often
    assert (per_feature - per_feature.mean()).abs().max() < 0.03
    again = perturbation.sample_keep(6000, 5, 10, torch.Generator().manual_seed(1))
    assert torch.equal(keep, again)
    other = perturbation.sample_keep(6000, 5, 10, subset_generator(0, 1))
    assert not torch.equal(keep, other)


def test_too_few_features_for_bins_is_explained():
    with pytest.raises(ValueError, match=r"cannot fill 10 bins.*num_bins` <= 5"):
        Perturbation.tabular(5).sample_keep(3, 0, 10)


def test_baselines():
    x = torch.rand(2, 3, 8, 8)
    assert make_baseline("zeros")(x).eq(0).all()
    assert make_baseline(0.3)(x).eq(0.3).all()
    mean = ChannelMeanBaseline.from_data(x)
    assert torch.allclose(mean(x)[0, :, 0, 0], x.mean(dim=(0, 2, 3)))
    blurred = BlurBaseline(sigma=1.0)(x)
    assert blurred.shape == x.shape and torch.allclose(blurred.mean(), x.mean(), atol=0.05)
    assert torch.allclose(BlurBaseline(sigma=1.0)(torch.full_like(x, 0.7)), torch.full_like(x, 0.7))
    noise = NoiseBaseline("gaussian", seed=3)
    assert torch.equal(noise(x), noise(x)) and torch.equal(noise(x)[0], noise(x)[1])
    assert not torch.equal(noise(x), NoiseBaseline("gaussian", seed=4)(x))
    uniform = make_baseline("uniform", low=-1.0, high=1.0)(x)
    assert uniform.min() >= -1 and uniform.max() <= 1


def test_baseline_specs_from_the_command_line_and_missing_arguments():
    x = torch.rand(2, 3, 8, 8)
    assert make_baseline("0.5")(x).eq(0.5).all()  # a number arrives as text from the CLI
    with pytest.raises(ValueError, match=r"baseline 'mean': .*'channel_mean'.*set it in `baseline_kwargs`"):
        make_baseline("mean")
    with pytest.raises(ValueError, match=r"baseline 'blur': .*'sigmaa'.*check `baseline_kwargs` against BlurBaseline"):
        make_baseline("blur", sigmaa=2.0)
    for bad in ("nan", "inf", float("nan")):
        with pytest.raises(ValueError, match="finite"):
            make_baseline(bad)
    with pytest.raises(ValueError, match="`channel_mean` must be finite"):
        make_baseline("mean", channel_mean=[0.1, float("nan")])


def test_raw_space_baseline_is_black_in_normalised_space():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    baseline = make_baseline("zeros", space="raw", mean=mean, std=std)
    out = baseline(torch.randn(1, 3, 2, 2))
    expected = -torch.tensor(mean) / torch.tensor(std)
    assert torch.allclose(out[0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="needs the model's normalisation"):
        make_baseline("zeros", space="raw")


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.tensor([0, 2, 3]), "no gaps"),
        (torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.tensor([1, 2]), "no gaps"),
    ],
)
def test_bad_feature_masks(mask, message):
    with pytest.raises(ValueError, match=message):
        Perturbation(mask)


def test_bad_shapes_and_keep():
    perturbation = Perturbation.patches((4, 4), patch_size=2)
    with pytest.raises(ValueError, match="does not fit inputs"):
        perturbation.apply(torch.zeros(1, 1, 5, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        perturbation.apply(torch.zeros(1, 1, 4, 4), torch.ones(1, 3))
    with pytest.raises(ValueError, match="only 0"):
        perturbation.level(torch.full((1, 4), 0.5))
    with pytest.raises(ValueError, match="batch 2"):
        perturbation.apply(torch.zeros(2, 1, 4, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="exactly one of"):
        patch_mask(4)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("pink")
