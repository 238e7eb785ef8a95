"""Mask clean-up (masks.py): identical to segment_anything's remove_small_regions, smoothing, laziness, params."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from segment_anything.utils.amg import remove_small_regions

from errors import ParamsError
from masks import (
    CleanedMasks,
    CleanupParams,
    ConcatMasks,
    clean_boxed,
    clean_mask,
    cleanup_params,
    mask_bounds,
    mask_box,
    with_bounds,
)


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


def edge_cases() -> dict[str, np.ndarray]:
    """Masks (H, W) bool where computing on the bounding box could go wrong: the mask at the image's border,
    holes on the box's edge, several islands, nothing, everything, one pixel."""
    rng = np.random.default_rng(7)
    cases = {}

    def new(height=48, width=64):
        return np.zeros((height, width), bool)

    for name, rows, cols in (("top", slice(0, 10), slice(20, 40)), ("bottom", slice(38, 48), slice(20, 40)),
                             ("left", slice(15, 30), slice(0, 12)), ("right", slice(15, 30), slice(50, 64)),
                             ("corner", slice(0, 14), slice(0, 18)), ("full height", slice(0, 48), slice(25, 35)),
                             ("full width", slice(20, 30), slice(0, 64))):
        mask = new()
        mask[rows, cols] = True
        mask[rows, cols] &= rng.random(mask[rows, cols].shape) < 0.8  # ragged: holes and specks on every edge
        cases[f"touches the {name} border"] = mask
    mask = new()
    mask[10:30, 10:30] = True
    mask[10:13, 18:21] = False  # a notch on the box's top edge: background outside, not a hole
    mask[20:23, 27:30] = False  # the same on its right edge
    mask[15:17, 15:17] = False  # a real hole
    cases["notches on the box's edges"] = mask
    mask = new()
    mask[0:20, 10:30] = True
    mask[0:3, 18:21] = False  # a notch at the image border: a small hole in remove_small_regions' sense
    cases["notch at the image border"] = mask
    mask = new()
    mask[:, 3:61] = True  # the crop (x 2..62) spans the height: bands of 2 columns (96 pixels) left and right
    mask[24, :] = False  # joined through the crop: one component of over 200 pixels
    mask[10:12, 10:12] = False
    cases["thin bands outside, joined through the box"] = mask
    cases["thin bands outside, apart"] = mask.copy()
    cases["thin bands outside, apart"][24, 30] = True
    mask = new()
    mask[1:47, 1:63] = True  # a one-pixel ring outside the box: small for large min_area
    mask[20:22, 20:22] = False
    cases["one-pixel ring outside"] = mask
    mask = new()
    for y, x, size in ((5, 5, 6), (30, 40, 3), (40, 10, 2), (10, 50, 5), (44, 60, 1)):
        mask[y : y + size, x : x + size] = True
    cases["several islands"] = mask
    mask = new()
    mask[5:25, 5:25] = True
    mask[8:22, 8:22] = False
    mask[12:18, 12:18] = True  # an island in the hole of another
    cases["island in a hole"] = mask
    cases["empty"] = new()
    cases["everything"] = np.ones((48, 64), bool)
    full = np.ones((48, 64), bool)
    full[0, 0] = full[20, 30] = full[47, 63] = False
    cases["everything but three pixels"] = full
    for y, x in ((0, 0), (47, 63), (20, 30), (0, 31)):
        mask = new()
        mask[y, x] = True
        cases[f"one pixel at {y},{x}"] = mask
    cases["odd-sized image"] = speckled(37, 53, 3, density=0.6)
    return cases


EDGE_CASES = edge_cases()


@pytest.mark.parametrize("area", [1, 4, 10, 30, 100, 300, 500, 5000])
@pytest.mark.parametrize("name", EDGE_CASES)
def test_identical_to_remove_small_regions_on_edge_cases(name, area):
    mask = EDGE_CASES[name]
    out = clean_mask(mask, CleanupParams(area, 0))
    np.testing.assert_array_equal(out, reference(mask, area))
    assert clean_boxed(mask, CleanupParams(area, 0))[1] == mask_bounds(out)


@pytest.mark.parametrize("seed", range(60))
def test_identical_to_remove_small_regions_on_blobs_with_flaws(seed):
    """Smooth shapes (what _is_clean passes) and the same with one small flaw (what it must not)."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(8, 80, 2))
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(-5, height + 5), rng.uniform(-5, width + 5)
    mask = ((yy - cy) / rng.uniform(2, height)) ** 2 + ((xx - cx) / rng.uniform(2, width)) ** 2 < 1
    flawed = mask.copy()
    y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
    flawed[y : y + 2, x : x + 2] ^= True
    for m in (mask, flawed):
        for area in (3, 50, 400):
            np.testing.assert_array_equal(clean_mask(m, CleanupParams(area, 0)), reference(m, area))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("radius", [1, 3])
def test_smoothing_on_the_box_equals_the_whole_image(seed, radius):
    mask = EDGE_CASES[list(EDGE_CASES)[seed]] if seed < 8 else speckled(40, 50, seed, density=0.7, corner=True)
    size = 2 * radius + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    whole = cv2.morphologyEx(cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    np.testing.assert_array_equal(clean_mask(mask, CleanupParams(0, radius)), whole.astype(bool))
    np.testing.assert_array_equal(clean_mask(mask, CleanupParams(30, radius)), reference(whole.astype(bool), 30))


def test_cleaned_masks_hand_over_their_bounds():
    masks = np.stack([EDGE_CASES["empty"], EDGE_CASES["several islands"], EDGE_CASES["touches the left border"]])
    lazy = ConcatMasks([masks[:1], CleanedMasks(masks[1:], CleanupParams(10, 0))])
    pairs = list(with_bounds(lazy))
    assert [b for _, b in pairs] == [None] + [mask_bounds(clean_mask(m, CleanupParams(10, 0))) for m in masks[1:]]
    assert pairs[1][1] == (5, 15, 5, 55)  # the islands of 9, 4 and 1 pixels dropped
    np.testing.assert_array_equal(np.stack([m for m, _ in pairs]), np.asarray(lazy))


@pytest.mark.parametrize("name", EDGE_CASES)
def test_bounds_from_row_and_column_profiles_are_mask_bounds(name):
    """detections.profile_bounds, what sam_wrapper.UpscaledMasks finds on a GPU from torch's any() per row and
    column, against mask_bounds on the host."""
    from detections import profile_bounds

    mask = EDGE_CASES[name]
    assert profile_bounds(mask.any(axis=1), mask.any(axis=0)) == mask_bounds(mask)


@pytest.mark.parametrize("name", EDGE_CASES)
def test_mask_bounds_are_the_foreground_pixels_extremes(name):
    """mask_bounds by 64-bit words (1-byte pixels, width a multiple of 8, contiguous) and by pixels (the rest)."""
    mask = EDGE_CASES[name]
    ys, xs = np.nonzero(mask)
    expected = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1) if len(ys) else None
    assert mask_bounds(mask) == expected  # bool, 64 wide: by words (the odd-sized case, 53 wide, by pixels)
    assert mask_bounds(mask.astype(np.uint8) * 7) == expected
    assert mask_bounds(mask.astype(np.float32)) == expected  # 4-byte pixels: by pixels
    assert mask_bounds(np.asfortranarray(mask)) == expected  # not row-contiguous: by pixels
    wider = np.zeros((mask.shape[0], 67), bool)  # 67 wide: by pixels
    wider[:, 1 : mask.shape[1] + 1] = mask
    shifted = None if expected is None else (expected[0], expected[1], expected[2] + 1, expected[3] + 1)
    assert mask_bounds(wider) == shifted
    for x in (0, 7, 8, 63):  # one pixel in each byte position of a word
        one = np.zeros((3, 64), bool)
        one[1, x] = True
        assert mask_bounds(one) == (1, 2, x, x + 1)


def row_convex_cases() -> dict[str, np.ndarray]:
    """Masks whose rows hold one run each (what _is_clean reads from its row runs), on and off the image's
    borders, and the few ways such a mask is not clean."""
    cases = {}
    rng = np.random.default_rng(7)
    for i in range(40):
        height, width = (int(v) for v in rng.integers(6, 70, 2))
        yy, xx = np.mgrid[0:height, 0:width]
        cy, cx = rng.uniform(-10, height + 10), rng.uniform(-10, width + 10)
        ry, rx = rng.uniform(1, height), rng.uniform(1, width)
        cases[f"ellipse {i}"] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    stairs = np.zeros((12, 20), bool)  # runs that shift left and right along the left border
    for y, (a, b) in enumerate([(3, 9), (0, 6), (2, 8), (0, 5), (4, 10), (0, 7), (1, 7), (0, 6), (3, 9), (0, 8),
                                (2, 6), (5, 9)]):
        stairs[y, a:b] = True
    cases["stairs on the left border, background pockets between"] = stairs
    cases["the same, from the top border down"] = np.pad(stairs, ((0, 3), (0, 0)))
    cases["the same, mirrored onto the right border"] = stairs[:, ::-1].copy()
    cases["the same, spanning the height"] = stairs[1:-1]
    diagonal = np.eye(15, 18, 2, dtype=bool)  # one 8-connected island: runs touching only at corners
    cases["a diagonal line"] = diagonal
    apart = np.zeros((10, 12), bool)  # rows of one run each, but two islands
    apart[1:4, 2:5] = True
    apart[4:8, 6:10] = True
    cases["two blocks touching nowhere"] = apart
    apart = apart.copy()
    apart[4, 5] = True  # now joined diagonally
    cases["two blocks joined at a corner"] = apart
    wedge = np.zeros((9, 10), bool)  # fills the image's width: background only at its left and right borders
    for y in range(9):
        wedge[y, max(0, 4 - y) : min(10, 6 + y)] = True
    cases["a wedge from the top border spanning the width"] = wedge
    cases["the wedge upside down at the bottom border"] = wedge[::-1].copy()
    cases["the wedge away from both"] = np.pad(wedge, ((2, 2), (0, 0)))
    return cases


ROW_CONVEX = row_convex_cases()


@pytest.mark.parametrize("area", [1, 3, 10, 40, 200])
@pytest.mark.parametrize("name", ROW_CONVEX)
def test_clean_masks_are_what_remove_small_regions_leaves_as_they_are(name, area):
    """_is_clean never calls a mask clean that the holes and islands steps change; the clean-up equals them."""
    from masks import _is_clean

    mask = ROW_CONVEX[name]
    expected = reference(mask, area)
    if mask.any() and _is_clean(mask, mask_bounds(mask), area):
        np.testing.assert_array_equal(expected, mask)
    np.testing.assert_array_equal(clean_mask(mask, CleanupParams(area, 0)), expected)


def test_row_runs_find_one_run_a_row_or_nothing():
    from masks import _is_clean, _row_runs

    clean = sum(_is_clean(m, mask_bounds(m), 3) for m in ROW_CONVEX.values() if m.any())
    assert clean >= 30  # the ellipses and most of the others: the cases above test that path, not just the other
    for name, mask in ROW_CONVEX.items():
        if not mask.any():
            continue
        y0, y1, x0, x1 = mask_bounds(mask)
        crop = mask[y0:y1, x0:x1]
        rows = [np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))) for row in crop]
        runs = _row_runs(crop)
        if all(len(r) == 2 for r in rows):
            np.testing.assert_array_equal(runs[0], [r[0] for r in rows], err_msg=name)
            np.testing.assert_array_equal(runs[1], [r[1] for r in rows], err_msg=name)
        else:
            assert runs is None, name
    gaps = np.zeros((5, 6), bool)
    gaps[0, 1:3] = gaps[2, 2:5] = gaps[2, 0] = gaps[4, :] = True  # empty rows, a row of two runs
    assert _row_runs(gaps) is None and _row_runs(gaps[:2]) is None
    assert _row_runs(gaps[2:]) is None  # as many runs as rows, but not one a row
