"""The Slicer side of SwinUNETR Segment, split by responsibility.

Modules that never import slicer, qt or ctk (tested with pytest, no Slicer):

* :mod:`.panel`: the texts the panel shows (progress, time left, devices, models);
* :mod:`.segments`: the segment table (names, colours, terminology) and the label
  array a run imports;
* :mod:`.worker`: the inference thread and the queue the GUI thread polls;
* :mod:`.models`: the models and devices offered, which model stays loaded, download progress;
* :mod:`.testing`: a stand-in segmenter and synthetic scans for the self-tests.

Modules that talk to Slicer (run inside Slicer only, on the main thread):

* :mod:`.mrml`: volume node in, segmentation node out, merge with existing segments;
* :mod:`.install`: torch through the PyTorch extension, then the pinned requirements;
* :mod:`.qtutils`: combo boxes and error messages of the panel;
* :mod:`.sampledata`: the abdominal CT in the Sample Data module;
* :mod:`.selftest`: the module's self-tests (mixed into ``SwinUNETRSegmentTest``).
"""
