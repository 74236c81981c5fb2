"""The merge decision: a run into an existing segmentation never overwrites what a person
edited or drew, unless they ticked "replace edited segments"."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from SwinUNETRSegmentLib.merge import Action, ExistingSegment, MergePolicy, mask_stamp, plan_merge, summarize

STAMP = "sha256:aaa"
OTHER = "sha256:bbb"


def unedited(name, sid=None):
    """Written by a run and untouched since: its voxels still match the stamp."""
    return ExistingSegment(sid or name, name, written_stamp=STAMP, current_stamp=STAMP)


def edited(name, sid=None):
    """Written by a run, then changed in Segment Editor."""
    return ExistingSegment(sid or name, name, written_stamp=STAMP, current_stamp=OTHER)


def hand_drawn(name, sid=None):
    """Made by a person (no run ever stamped it)."""
    return ExistingSegment(sid or name, name)


def actions(steps):
    return {s.name: s.action for s in steps}


DEFAULT = MergePolicy()
UPDATE = MergePolicy(update_unedited=True)
REPLACE = MergePolicy(replace_edited=True)


def test_into_an_empty_segmentation_every_label_is_added():
    steps = plan_merge(["spleen", "liver"], [])
    assert [(s.name, s.action, s.segment_id) for s in steps] == [
        ("spleen", Action.ADD, None),
        ("liver", Action.ADD, None),
    ]


def test_default_adds_only_segments_not_there_yet():
    existing = [unedited("spleen"), edited("liver"), hand_drawn("aorta")]
    steps = plan_merge(["spleen", "liver", "aorta", "stomach"], existing, DEFAULT)
    assert actions(steps) == {"spleen": Action.KEEP, "liver": Action.KEEP, "aorta": Action.KEEP, "stomach": Action.ADD}
    assert {s.name: s.segment_id for s in steps if s.action == Action.KEEP} == {
        "spleen": "spleen",
        "liver": "liver",
        "aorta": "aorta",
    }


def test_update_unedited_replaces_only_what_no_one_touched():
    existing = [unedited("spleen", "Segment_1"), edited("liver", "Segment_6"), hand_drawn("aorta", "my aorta")]
    steps = {s.name: s for s in plan_merge(["spleen", "liver", "aorta"], existing, UPDATE)}
    assert (steps["spleen"].action, steps["spleen"].segment_id) == (Action.REPLACE, "Segment_1")
    assert (steps["liver"].action, steps["liver"].reason) == (Action.KEEP, "edited since the last run")
    assert (steps["aorta"].action, steps["aorta"].reason) == (Action.KEEP, "not written by a run")


def test_replace_edited_replaces_edited_and_hand_drawn_segments():
    existing = [unedited("spleen"), edited("liver"), hand_drawn("aorta")]
    steps = plan_merge(["spleen", "liver", "aorta"], existing, REPLACE)
    assert actions(steps) == {"spleen": Action.REPLACE, "liver": Action.REPLACE, "aorta": Action.REPLACE}


def test_a_segment_whose_voxels_could_not_be_stamped_counts_as_edited():
    unknown = ExistingSegment("liver", "liver", written_stamp=STAMP, current_stamp=None)
    assert unknown.edited
    assert actions(plan_merge(["liver"], [unknown], UPDATE)) == {"liver": Action.KEEP}


def test_names_match_ignoring_case_and_spaces():
    steps = plan_merge(["right kidney"], [edited(" Right  Kidney", "rk")], DEFAULT)
    assert (steps[0].action, steps[0].segment_id) == (Action.KEEP, "rk")


def test_two_segments_with_the_run_s_name_are_kept_in_every_mode():
    existing = [unedited("liver", "a"), unedited("liver", "b")]
    for policy in (DEFAULT, UPDATE, REPLACE):
        (step,) = plan_merge(["liver"], existing, policy)
        assert step.action == Action.KEEP and "2 segments" in step.reason


def test_segments_the_run_did_not_find_are_not_touched():
    steps = plan_merge(["spleen"], [unedited("liver"), hand_drawn("tumour")], REPLACE)
    assert [s.name for s in steps] == ["spleen"]


def test_one_step_per_name_in_the_order_given():
    steps = plan_merge(["liver", "spleen", "Liver"], [], DEFAULT)
    assert [s.name for s in steps] == ["liver", "spleen"]


@pytest.mark.parametrize("update_unedited, replace_edited", list(itertools.product([False, True], repeat=2)))
def test_an_edited_segment_is_replaced_only_when_the_user_asked(update_unedited, replace_edited):
    """The invariant the user relies on, over every policy and every kind of existing segment."""
    policy = MergePolicy(update_unedited=update_unedited, replace_edited=replace_edited)
    for make in (edited, hand_drawn):
        (step,) = plan_merge(["liver"], [make("liver")], policy)
        assert (step.action == Action.REPLACE) == replace_edited


def test_stamps_are_needed_only_to_tell_edited_from_unedited():
    assert UPDATE.needs_stamps
    assert not DEFAULT.needs_stamps
    assert not REPLACE.needs_stamps
    assert not MergePolicy(update_unedited=True, replace_edited=True).needs_stamps


def test_mask_stamp_changes_with_one_voxel_and_ignores_the_dtype():
    mask = np.zeros((7, 5, 3), np.uint8)
    mask[2:5, 1:4, 1] = 1
    assert mask_stamp(mask) == mask_stamp(mask.astype(bool)) == mask_stamp(mask * 255)
    changed = mask.copy()
    changed[0, 0, 0] = 1
    assert mask_stamp(changed) != mask_stamp(mask)
    # same bits, other grid: another segment
    assert mask_stamp(np.zeros((4, 2, 1))) != mask_stamp(np.zeros((2, 4, 1)))
    assert mask_stamp(mask).startswith("sha256:")


def test_summary_says_what_happened_to_which_segment():
    steps = plan_merge(["spleen", "liver", "stomach"], [unedited("spleen"), edited("liver")], UPDATE)
    assert summarize(steps) == "added 1 (stomach); replaced 1 (spleen); kept 1 (liver)"
    assert summarize([]) == "no segments found"
    many = plan_merge([f"organ {n}" for n in range(8)], [], DEFAULT)
    assert summarize(many).startswith("added 8 (organ 0, organ 1") and summarize(many).endswith("and 2 more)")
