"""The Slicer side of SwinUNETR Segment, split by responsibility.

Slicer's process never imports torch or MONAI and starts no thread: the model runs in the
engine process (``swinunetr-segment serve``: on this computer a child process run by
PythonSlicer, or a server), and the panel's QTimer moves each run on a few ms at a time.

Modules that never import slicer, qt or ctk (tested with pytest, no Slicer):

* :mod:`.panel`: the texts the panel shows (progress, time left, devices, models);
* :mod:`.segments`: the segment table (names, colours, terminology) and the labels a run imports;
* :mod:`.models`: the models offered (weights here, or downloadable and verifiable);
* :mod:`.packages`: what may be installed into Slicer's Python (never a package Slicer ships);
* :mod:`.nbhttp`: HTTP exchanges on non-blocking sockets, moved on a step at a time;
* :mod:`.enginerun`: one run in the engine (start, upload, poll, fetch the labels);
* :mod:`.download`: a model's weights downloaded by a child process;
* :mod:`.controller`: one run at a time, the progress bar, Apply during the install, the
  question asked once per server, letting the engine go;
* :mod:`.testing`: stand-in segmenters and synthetic scans for the tests.

Modules that import slicer but never qt or ctk (tested on slicer-core's real MRML classes):

* :mod:`.mrml`: volume node in, segmentation node out, merge with existing segments;
* :mod:`.logic`: a run from a volume node to a segmentation node (the module's Logic).

Modules that need Slicer's application (Qt):

* :mod:`.install`: torch the PyTorch extension's way, then the pinned requirements;
* :mod:`.qtutils`: combo boxes, error messages, settings, views;
* :mod:`.sampledata`: the abdominal CT in the Sample Data module;
* :mod:`.selftest`: the module's self-tests (mixed into ``SwinUNETRSegmentTest``).
"""
