"""The card's connected-component clean-up, applied by the engine on the input grid."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
from test_fastpath import LIVER, SPLEEN, ThresholdNet, body_volume, oracle_card

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.engine import Segmenter
from SwinUNETRSegmentLib.inference.postprocess import PostProcessing, clean_labels


def _card(**post):
    return dataclasses.replace(oracle_card(), postprocessing=post)


def _labels():
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[2:20, 2:20, 2:20] = 1  # a big organ
    lab[30:33, 30:33, 30:33] = 1  # an island of it (27 voxels)
    lab[25:35, 2:12, 2:12] = 2  # another organ
    lab[38, 38, 38] = 2  # a one-voxel speck
    return lab


def test_keep_largest_drops_islands_of_single_organ_labels():
    lab = _labels()
    out = lab.copy()
    stats = clean_labels(out, 1.0, PostProcessing(frozenset({1}), 0.0))
    assert stats == {"components_removed": 1, "voxels_removed": 27}
    assert (out[30:33, 30:33, 30:33] == 0).all() and (out[2:20, 2:20, 2:20] == 1).all()
    np.testing.assert_array_equal(out == 2, lab == 2)  # label 2 was not asked for


def test_minimum_volume_in_mm3_uses_the_voxel_size():
    lab = _labels()
    out = lab.copy()
    clean_labels(out, 2.0, PostProcessing(frozenset(), 60.0))  # 27 voxels x 2 mm^3 < 60: dropped; 1 voxel too
    assert out[31, 31, 31] == 0 and out[38, 38, 38] == 0 and out[5, 5, 5] == 1 and out[30, 5, 5] == 2
    out = lab.copy()
    clean_labels(out, 3.0, PostProcessing(frozenset(), 60.0))  # 27 x 3 = 81 mm^3: kept
    assert out[31, 31, 31] == 1 and out[38, 38, 38] == 0


def test_diagonal_neighbours_are_one_component():
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[1, 1, 1] = lab[2, 2, 2] = lab[3, 3, 3] = 3
    clean_labels(lab, 1.0, PostProcessing(frozenset({3}), 0.0))
    assert np.count_nonzero(lab) == 3


def _peak_bytes(n_labels: int) -> tuple[int, np.ndarray]:
    lab = np.zeros((200, 200, 100), np.uint8)
    lab[0, 0, 0] = lab[-1, -1, -1] = 1  # the same labelled box, whatever the number of labels
    for value in range(1, n_labels + 1):
        lab[value * 20 : value * 20 + 10, 20:60, 10:40] = value
        lab[value * 20, 150, 90] = value  # an island each
    tracemalloc.start()
    try:
        clean_labels(lab, 1.0, PostProcessing(frozenset(range(1, n_labels + 1)), 0.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, lab


def test_memory_is_one_component_map_whatever_the_number_of_labels():
    """Never a full-size copy per class: the clean-up holds one component map of the labelled box
    (4 bytes a voxel) and masks of a byte a voxel, for 2 labels as for 8."""
    peak2, _ = _peak_bytes(2)
    peak8, lab = _peak_bytes(8)
    assert peak8 < 7 * lab.size, f"{peak8} bytes for a {lab.nbytes}-byte label map"
    assert peak8 < 1.1 * peak2, (peak2, peak8)
    assert lab[20, 150, 90] == 0 and lab[160, 150, 90] == 0 and lab[25, 30, 20] == 1 and lab[165, 30, 20] == 8
    assert lab[0, 0, 0] == 0 and lab[-1, -1, -1] == 0  # specks of label 1, smaller than its block


def test_only_the_labelled_box_is_mapped():
    """A trained network's organs fill part of a scan: the component map covers their box only."""
    lab = np.zeros((300, 300, 200), np.uint8)
    lab[100:140, 100:140, 50:90] = 1
    lab[150:152, 150:152, 100:102] = 1
    tracemalloc.start()
    try:
        stats = clean_labels(lab, 1.0, PostProcessing(frozenset({1}), 0.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats == {"components_removed": 1, "voxels_removed": 8}
    assert peak < lab.nbytes / 4, f"{peak} bytes for a {lab.nbytes}-byte label map"


def test_ties_keep_the_component_found_first_in_the_arrays_order():
    """Two components of the same size: the one whose first voxel comes first (C order) stays,
    as scipy's label-by-label clean-up kept it, whatever order cc3d numbers them in."""
    for order in ("C", "F"):
        lab = np.zeros((10, 10, 10), np.uint8, order=order)
        lab[7:9, 0:2, 0:2] = 4  # its first voxel (7, 0, 0) comes first in F order, not in C order
        lab[0:2, 7:9, 7:9] = 4  # (0, 7, 7) comes first in C order
        clean_labels(lab, 1.0, PostProcessing(frozenset({4}), 0.0))
        assert (lab[0:2, 7:9, 7:9] == 4).all() and not lab[7:9, 0:2, 0:2].any(), order


def test_the_engine_applies_what_the_card_declares():
    vol, liver, spleen = body_volume(("2mm", (2.0, 2.0, 2.0), np.eye(3), (0.0, 0.0, 0.0)))
    # a speck of 'spleen' far from the spleen, in the liver's place in the image's corner
    arr = vol.array.copy()
    arr[1, 1, 1] = 250
    speck = Volume(arr, vol.ijk_to_ras)
    plain = Segmenter(oracle_card(), network=ThresholdNet(), device="cpu").segment(speck)
    assert plain.labels.array[1, 1, 1] == SPLEEN
    card = _card(keep_largest_component=["spleen"], min_component_mm3=0)
    res = Segmenter(card, network=ThresholdNet(), device="cpu").segment(speck)
    assert res.labels.array[1, 1, 1] == 0 and res.stats["components_removed"] >= 1
    assert "postprocess" in res.timings
    np.testing.assert_array_equal(res.labels.array == LIVER, plain.labels.array == LIVER)
    assert (res.labels.array == SPLEEN).sum() == (plain.labels.array == SPLEEN).sum() - 1


@pytest.mark.parametrize(
    "post, message",
    [
        ({"keep_largest_component": ["no such organ"]}, "does not have: no such organ"),
        ({"keep_largest_component": "yes"}, "true, false or a list"),
        ({"min_component_mm3": -5}, "min_component_mm3 must be a number"),
        ({"largest": True}, "unknown postprocessing keys"),
    ],
)
def test_a_bad_declaration_is_one_line(post, message):
    with pytest.raises(UserError, match=message):
        Segmenter(_card(**post), network=ThresholdNet(), device="cpu")


def test_the_card_round_trips_its_declaration():
    from conftest import tiny_card

    from SwinUNETRSegmentLib.models.cards import card_from_dict

    card = dataclasses.replace(tiny_card(), postprocessing={"keep_largest_component": True, "min_component_mm3": 250.0})
    again = card_from_dict(card.to_json())
    assert again.postprocessing == {"keep_largest_component": True, "min_component_mm3": 250.0}
    assert PostProcessing.from_card(again).keep_largest == frozenset(lab.value for lab in card.labels)
