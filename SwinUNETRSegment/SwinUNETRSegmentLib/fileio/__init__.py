"""Files in and out: scans read into volumes, segmentations written where Slicer reads them.

- :mod:`.read`: NIfTI, NRRD, MetaImage files and DICOM series folders into a ``Volume``.
- :mod:`.dicom`: a DICOM series' headers and the geometry checks every DICOM input passes.
- :mod:`.dicomseg`: DICOM SEG (highdicom) written from a run and read back as training labels.
- :mod:`.dicomweb`: series from a DICOMweb server in, DICOM SEG back (QIDO, WADO, STOW).
- :mod:`.write`: outputs checked before the work; ``.seg.nrrd`` or NIfTI + colour-table CSV.
- :mod:`.segnrrd`: Slicer's ``.seg.nrrd`` (slicerio), with the card's segment table.
- :mod:`.preview`: a PNG of three orthogonal slices with the segments overlaid.
- :mod:`.atomic`: the one atomic writer and file hasher every file of the package goes through.
- :mod:`.sampledata`: the real example CT of the tests and the demo.

(The folder is not called ``io`` so that it does not shadow the standard library's module.)
"""

__all__ = ["atomic", "dicom", "dicomseg", "dicomweb", "preview", "read", "sampledata", "segnrrd", "write"]
