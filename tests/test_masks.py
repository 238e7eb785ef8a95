"""Mask clean-up (masks.py): identical to segment_anything's remove_small_regions, smoothing, laziness, params."""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything.utils.amg import remove_small_regions

from errors import ParamsError
from masks import CleanedMasks, CleanupParams, ConcatMasks, clean_mask, cleanup_params, mask_box


def reference(mask, area):
    """SamAutomaticMaskGenerator.postprocess_small_regions' order: holes, then islands."""
    mask, _ = remove_small_regions(mask, area, mode="holes")
    mask, _ = remove_small_regions(mask, area, mode="islands")
    return mask


def speckled(height, width, seed, density=0.5, corner=False):
    rng = np.random.default_rng(seed)
    mask = rng.random((height, width)) < density
    if corner:  # a mask away from the top and left edges: the bounding-box crop path
        mask[: height // 3] = False
        mask[:, : width // 4] = False
    return mask


@pytest.mark.parametrize("seed", range(40))
def test_identical_to_remove_small_regions_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 60, 2))
    mask = speckled(height, width, seed, rng.uniform(0.05, 0.95), corner=seed % 2 == 0)
    for area in (1, 3, 17, 100):
        expected = reference(mask, area)
        np.testing.assert_array_equal(clean_mask(mask, CleanupParams(area, 0)), expected)
    for mode in ("holes", "islands"):  # each step alone, through the module's own function
        from masks import _remove_small, mask_bounds

        out, bounds = _remove_small(mask, 20, mode == "holes", mask_bounds(mask))
        np.testing.assert_array_equal(out, remove_small_regions(mask, 20, mode)[0])
        assert bounds == mask_bounds(out)


def test_identical_on_a_photo_sized_mask_with_holes_islands_and_a_tie():
    height, width = 600, 800
    yy, xx = np.mgrid[0:height, 0:width]
    mask = (xx - 400) ** 2 / 250**2 + (yy - 300) ** 2 / 150**2 < 1
    mask ^= speckled(height, width, 1, density=0.01)
    mask[10:13, 700:703] = True  # a 9-pixel island in the corner region
    for area in (5, 100, 5000):
        np.testing.assert_array_equal(clean_mask(mask, CleanupParams(area, 0)), reference(mask, area))
    ties = np.zeros((40, 40), bool)
    ties[5, 5] = ties[20, 31] = ties[33, 9] = True  # every island small, equal sizes: the same one is kept
    np.testing.assert_array_equal(clean_mask(ties, CleanupParams(4, 0)), reference(ties, 4))
    empty = np.zeros((5, 5), bool)
    np.testing.assert_array_equal(clean_mask(empty, CleanupParams(100, 0)), reference(empty, 100))


def test_clean_up_fills_holes_drops_specks_and_smooths():
    mask = np.zeros((100, 100), bool)
    mask[20:80, 20:80] = True
    mask[40:43, 40:43] = False  # a hole
    mask[5, 5] = True  # a speck
    mask[20:30, 51] = False  # a crack from the edge
    mask[50, 80:90] = True  # a thin spur
    out = clean_mask(mask, CleanupParams(min_area=20, smooth=0))
    assert out[41, 41] and not out[5, 5] and not out[25, 51]  # the crack is open to the outside: no hole
    smooth = clean_mask(mask, CleanupParams(min_area=20, smooth=2))
    assert smooth[25, 51] and not smooth[50, 85]  # the crack closed, the spur opened away
    assert not smooth[20, 20] and smooth[50, 50]  # corners rounded, inside kept
    assert clean_mask(mask, CleanupParams(0, 0)) is not None
    np.testing.assert_array_equal(clean_mask(mask, CleanupParams(0, 0)), mask)
    assert mask_box(out) == [20.0, 20.0, 90.0, 80.0] and mask_box(np.zeros((3, 3), bool)) == [0.0] * 4


def test_cleaned_masks_are_cleaned_as_they_are_read_one_at_a_time():
    reads = []

    class Source:  # a lazy sequence like sam_wrapper.UpscaledMasks
        shape = (3, 30, 30)

        def __len__(self):
            return 3

        def __iter__(self):
            for i in range(3):
                reads.append(i)
                mask = np.zeros((30, 30), bool)
                mask[5:25, 5:25] = True
                mask[0, i] = True
                yield mask

    lazy = CleanedMasks(Source(), CleanupParams(5, 0))
    assert reads == [] and lazy.shape == (3, 30, 30)
    iterator = iter(lazy)
    first = next(iterator)
    assert reads == [0] and not first[0, 0]
    assert len(list(iterator)) == 2 and reads == [0, 1, 2]
    both = ConcatMasks([np.zeros((1, 30, 30), bool), lazy])
    assert both.shape == (4, 30, 30) and np.asarray(both).shape == (4, 30, 30)


@pytest.mark.parametrize(
    "values, message",
    [({"mask_min_area": -1}, "x.mask_min_area must be a whole number between 0 and 100000000"),
     ({"mask_min_area": 2.5}, "x.mask_min_area must be a whole number"),
     ({"mask_smooth": "3"}, "x.mask_smooth must be a whole number between 0 and 100"),
     ({"mask_smooth": True}, "x.mask_smooth")],
)
def test_bad_params_name_the_key(values, message):
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        cleanup_params(values, 100, 0, "x.")
    assert cleanup_params({}, 100, 0) == CleanupParams(100, 0)
    assert cleanup_params({"mask_min_area": 0, "mask_smooth": 3.0}, 100, 0) == CleanupParams(0, 3)
