"""Which segments a run may write into a segmentation that already has segments.

A clinician's edits are never lost: this module decides, from segment names and edit
stamps alone, what a run does with each label it produced. It knows nothing of Slicer;
the Slicer layer reads names and stamps from the segmentation node, asks
:func:`plan_merge`, and carries the plan out.

Rules, for each label the run found (matched to existing segments by name, ignoring
case and surrounding spaces):

* no segment of that name yet: **add** it;
* a segment of that name exists (default): **keep** it, whatever it holds;
* ``update_unedited``: **replace** it only when its voxels are exactly what an earlier
  run wrote (its stamp still matches), so nothing a person drew is overwritten;
* ``replace_edited``: **replace** it even when it was edited or drawn by hand;
* two or more segments share the name: **keep** them all (which one would be replaced
  is a guess), in every mode.

The edit stamp is a hash of the segment's voxels on the input grid
(:func:`mask_stamp`), written as a segment tag when a run writes the segment and
recomputed when the next run looks at it. A segment without a stamp, or whose stamp
cannot be computed, counts as edited.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

#: Segment tag that holds the stamp of the voxels a run wrote.
STAMP_TAG = "SwinUNETRSegment.VoxelStamp"
#: Segment tag naming the model that wrote the segment.
MODEL_TAG = "SwinUNETRSegment.Model"


class Action(str, enum.Enum):
    ADD = "add"
    REPLACE = "replace"
    KEEP = "keep"


@dataclass(frozen=True)
class MergePolicy:
    """What a run may do to segments that are already there.

    Attributes:
        update_unedited: replace segments that no one changed since a run wrote them.
        replace_edited: replace segments even when someone edited them (implies
            ``update_unedited``).
    """

    update_unedited: bool = False
    replace_edited: bool = False

    @property
    def needs_stamps(self) -> bool:
        """True when the plan depends on whether existing segments were edited."""
        return self.update_unedited and not self.replace_edited


@dataclass(frozen=True)
class ExistingSegment:
    """A segment already in the target segmentation.

    Attributes:
        segment_id: its ID in the segmentation.
        name: its name as shown to the user.
        written_stamp: the :data:`STAMP_TAG` a run left on it; None when no run wrote it.
        current_stamp: :func:`mask_stamp` of its voxels now; None when not computed.
    """

    segment_id: str
    name: str
    written_stamp: Optional[str] = None
    current_stamp: Optional[str] = None

    @property
    def edited(self) -> bool:
        """True unless its voxels are provably what a run wrote."""
        return self.written_stamp is None or self.current_stamp is None or self.current_stamp != self.written_stamp


@dataclass(frozen=True)
class MergeStep:
    """What happens to one label of the run.

    Attributes:
        name: the label's segment name.
        action: add a new segment, replace an existing one, or keep the existing one.
        segment_id: the existing segment that is replaced or kept; None for ADD.
        reason: a short phrase for the user ("edited since the last run").
    """

    name: str
    action: Action
    segment_id: Optional[str]
    reason: str


def name_key(name: str) -> str:
    """Names match ignoring case and surrounding/repeated spaces: "Liver " is "liver"."""
    return " ".join(str(name).split()).casefold()


def plan_merge(
    names: Iterable[str], existing: Sequence[ExistingSegment], policy: MergePolicy = MergePolicy()
) -> list[MergeStep]:
    """The action for each label name a run produced, in the order given.

    Args:
        names: segment names of the labels the run found (present in its output).
        existing: the segments already in the target segmentation. ``current_stamp`` is
            only read when ``policy.needs_stamps``.
        policy: what may be replaced.
    """
    by_name: dict[str, list[ExistingSegment]] = {}
    for seg in existing:
        by_name.setdefault(name_key(seg.name), []).append(seg)

    steps: list[MergeStep] = []
    seen: set[str] = set()
    for name in names:
        key = name_key(name)
        if key in seen:
            continue  # one step per name, even if a caller repeats it
        seen.add(key)
        matches = by_name.get(key, [])
        if not matches:
            steps.append(MergeStep(name, Action.ADD, None, "new"))
        elif len(matches) > 1:
            steps.append(MergeStep(name, Action.KEEP, matches[0].segment_id, f"{len(matches)} segments have this name"))
        else:
            seg = matches[0]
            if policy.replace_edited:
                steps.append(MergeStep(name, Action.REPLACE, seg.segment_id, "replace edited segments is on"))
            elif not policy.update_unedited:
                steps.append(MergeStep(name, Action.KEEP, seg.segment_id, "already there"))
            elif seg.edited:
                why = "not written by a run" if seg.written_stamp is None else "edited since the last run"
                steps.append(MergeStep(name, Action.KEEP, seg.segment_id, why))
            else:
                steps.append(MergeStep(name, Action.REPLACE, seg.segment_id, "unchanged since the last run"))
    return steps


def mask_stamp(mask: np.ndarray) -> str:
    """A stamp of which voxels a segment holds: equal masks give equal stamps.

    Any nonzero value counts as inside, so a uint8 0/1 export and a boolean mask of the
    same voxels stamp the same. The array's shape is part of the stamp.
    """
    m = np.ascontiguousarray(np.asarray(mask) != 0)
    h = hashlib.sha256()
    h.update(repr(tuple(int(s) for s in m.shape)).encode("ascii"))
    h.update(np.packbits(m, axis=None).tobytes())
    return "sha256:" + h.hexdigest()


def summarize(steps: Sequence[MergeStep]) -> str:
    """One line for the user: "added 3 (liver, spleen, aorta); kept 1 edited (stomach)"."""
    parts = []
    for action, verb in ((Action.ADD, "added"), (Action.REPLACE, "replaced"), (Action.KEEP, "kept")):
        chosen = [s.name for s in steps if s.action == action]
        if chosen:
            shown = ", ".join(chosen[:6]) + (f" and {len(chosen) - 6} more" if len(chosen) > 6 else "")
            parts.append(f"{verb} {len(chosen)} ({shown})")
    return "; ".join(parts) if parts else "no segments found"
