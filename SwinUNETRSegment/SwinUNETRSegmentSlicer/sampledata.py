"""The module's entry in Slicer's Sample Data module: an abdominal CT to try it on."""

import os

import slicer
from slicer.i18n import tr as _

#: Slicer's own CTLiver sample (Medical Segmentation Decathlon, Task03_Liver liver_100,
#: portal-venous abdominal CT, CC-BY-SA 4.0), verified by its SHA256 on download.
ABDOMEN_CT_SHA256 = "e16eae0ae6fefa858c5c11e58f0f1bb81834d81b7102e021571056324ef6f37e"


def registerSampleData():
    """Register the sample in a "SwinUNETR Segment" section of the Sample Data module.

    Only ``registerCustomSampleDataSource`` (Slicer 5.10 and newer): its ``category`` is the
    section's title. ``registerCustomSampleDataCategory`` exists from Slicer 5.12 only.
    """
    import SampleData

    iconsPath = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=_("SwinUNETR Segment"),
        sampleName="SwinUNETRAbdomenCT",
        thumbnailFileName=os.path.join(iconsPath, "SwinUNETRSegment.png"),
        uris=slicer.util.TESTING_DATA_URL + "SHA256/" + ABDOMEN_CT_SHA256,
        fileNames="CTLiver.nrrd",
        checksums="SHA256:" + ABDOMEN_CT_SHA256,
        nodeNames="AbdomenCT",
    )
