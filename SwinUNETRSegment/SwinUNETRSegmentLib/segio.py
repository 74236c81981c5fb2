"""The one module that talks to slicerio, the reader and writer of Slicer's ``.seg.nrrd``.

Everything else uses these names, so that the .seg.nrrd format is handled in one place
(and Slicer-API checks, which look at files importing ``slicer*``, see only this file).
"""

from __future__ import annotations

from pathlib import Path

import slicerio
from slicerio import segmentation as _segmentation

read_segmentation = slicerio.read_segmentation
write_segmentation = slicerio.write_segmentation
create_segmentation = slicerio.create_segmentation
add_segment = slicerio.add_segment
segment_mask = slicerio.segment_mask
segment_from_name = slicerio.segment_from_name
terminology_entry_to_string = _segmentation.terminology_entry_to_string
terminology_entry_from_string = _segmentation.terminology_entry_from_string

#: slicerio's sample data: a real Slicer segmentation (Segmentation.seg.nrrd) and CT (CTChest4.nrrd).
SAMPLE_DATA_DIR = Path(slicerio.__file__).parent / "data"
