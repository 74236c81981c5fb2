"""Between MRML nodes and the engine. Main thread only: every function here touches the scene.

* :func:`volumeFromNode` copies a volume node's voxels and geometry for the worker thread.
* :func:`writeSegments` puts a run's labels into a segmentation node: one segment per
  label with the card's name, colour and terminology, merged with the segments already
  there as :func:`SwinUNETRSegmentLib.merge.plan_merge` decides, each written segment
  stamped so that the next run can tell whether someone edited it.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
import vtkSegmentationCorePython as vtkSegmentationCore

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.inference.api import SegmentationResult
from SwinUNETRSegmentLib.merge import (
    MODEL_TAG,
    STAMP_TAG,
    Action,
    ExistingSegment,
    MergePolicy,
    MergeStep,
    mask_stamp,
    name_key,
    plan_merge,
)

from .segments import SegmentSpec, labels_for_import, present_values, segment_id_slots, segment_specs, stamps_by_value


def volumeFromNode(volumeNode) -> Volume:
    """A copy of ``volumeNode``'s voxels with its IJK-to-RAS matrix (parent transforms not applied)."""
    arrayKji = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    return Volume.from_kji(arrayKji, slicer.util.arrayFromVTKMatrix(ijkToRas))


def createSegmentationNode(inputVolume, name: str):
    """A new segmentation on ``inputVolume``'s grid, beside it in the subject hierarchy."""
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name)
    )
    segmentationNode.CreateDefaultDisplayNodes()
    prepareSegmentationNode(segmentationNode, inputVolume)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(inputVolume))
    shNode.SetItemParent(shNode.GetItemByDataNode(segmentationNode), studyItem)
    return segmentationNode


def prepareSegmentationNode(segmentationNode, inputVolume) -> None:
    """Make ``segmentationNode`` ready to take labels on ``inputVolume``'s grid.

    Raises UserError when it holds segments that are not binary labelmaps (for example
    imported models), which labels cannot be merged into.
    """
    segmentation = segmentationNode.GetSegmentation()
    binaryLabelmap = vtkSegmentationCore.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() == 0:
        segmentationNode.SetSourceRepresentationToBinaryLabelmap()
    elif segmentation.GetSourceRepresentationName() != binaryLabelmap:
        raise UserError(
            f"segmentation '{segmentationNode.GetName()}' holds {segmentation.GetSourceRepresentationName()} segments, "
            "not a labelmap; choose 'Create new segmentation' as the output"
        )
    referenceRole = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    if not segmentationNode.GetNodeReference(referenceRole):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
    if not segmentationNode.GetDisplayNode():
        segmentationNode.CreateDefaultDisplayNodes()
    if segmentation.GetNumberOfSegments() == 0:
        segmentationNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())


def existingSegments(segmentationNode, inputVolume, stampNames=()) -> list[ExistingSegment]:
    """The segments of ``segmentationNode`` with their edit stamps.

    The current stamp (a hash of the voxels on ``inputVolume``'s grid) is computed only
    for stamped segments whose name is in ``stampNames``: exporting a segment costs time.
    """
    wanted = {name_key(n) for n in stampNames}
    segmentation = segmentationNode.GetSegmentation()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        tag = vtk.mutable("")
        written = str(tag) if segment.GetTag(STAMP_TAG, tag) else None
        current = None
        if written is not None and name_key(segment.GetName()) in wanted:
            try:
                current = mask_stamp(
                    slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, inputVolume)
                )
            except RuntimeError:
                current = None  # cannot be exported: counts as edited, so it is kept
        segments.append(ExistingSegment(segmentId, segment.GetName(), written, current))
    return segments


def writeSegments(
    segmentationNode, result: SegmentationResult, inputVolume, policy: MergePolicy = MergePolicy()
) -> list[MergeStep]:
    """Write ``result`` into ``segmentationNode`` as ``policy`` allows; returns what was done per label."""
    prepareSegmentationNode(segmentationNode, inputVolume)
    labelsKji = np.ascontiguousarray(result.labels.kji())
    specs = segment_specs(result.card, present_values(labelsKji))
    names = [spec.name for spec in specs]
    existing = existingSegments(segmentationNode, inputVolume, names if policy.needs_stamps else ())
    steps = plan_merge(names, existing, policy)

    segmentation = segmentationNode.GetSegmentation()
    specByName = {spec.name: spec for spec in specs}
    assignments: dict[int, str] = {}
    for step in steps:
        value = specByName[step.name].value
        if step.action == Action.REPLACE:
            assignments[value] = step.segment_id
        elif step.action == Action.ADD:
            segmentId = segmentation.GenerateUniqueSegmentID(step.name)
            while segmentId in assignments.values():
                segmentId = segmentation.GenerateUniqueSegmentID(segmentId + "_")
            assignments[value] = segmentId
    if not assignments:
        return steps

    wasModified = segmentationNode.StartModify()
    try:
        importLabels(segmentationNode, labelsKji, assignments, inputVolume)
        stamps = stamps_by_value(labelsKji, list(assignments))
        specByValue = {spec.value: spec for spec in specs}
        for value, segmentId in assignments.items():
            describeSegment(segmentation.GetSegment(segmentId), specByValue[value], stamps[value], result.card.name)
    finally:
        segmentationNode.EndModify(wasModified)
    return steps


def importLabels(segmentationNode, labelsKji: np.ndarray, assignments: dict[int, str], inputVolume) -> None:
    """Import the voxels of the assigned label values into the assigned segments (created if new)."""
    labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__SwinUNETRSegment_import__")
    try:
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        labelmapNode.SetIJKToRASMatrix(ijkToRas)
        labelmapNode.SetAndObserveTransformNodeID(
            inputVolume.GetTransformNodeID()
        )  # the import maps it into the segmentation's frame
        slicer.util.updateVolumeFromArray(labelmapNode, labels_for_import(labelsKji, assignments))
        segmentIds = vtk.vtkStringArray()
        for segmentId in segment_id_slots(assignments):
            segmentIds.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
            labelmapNode, segmentationNode, segmentIds
        ):
            raise RuntimeError("importing the labels into the segmentation failed")
    finally:
        slicer.mrmlScene.RemoveNode(labelmapNode)


def describeSegment(segment, spec: SegmentSpec, stamp: str, modelName: str) -> None:
    """Name, colour, SNOMED terminology and the tags a later run and DICOM export read."""
    segment.SetName(spec.name)
    segment.SetColor(*spec.color)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.SetTag(segment.GetTerminologyEntryTagName(), spec.terminology)
    segment.SetTag(STAMP_TAG, stamp)
    segment.SetTag(MODEL_TAG, modelName)
    segment.SetTag("DICOM.SegmentAlgorithmType", "AUTOMATIC")
    segment.SetTag("DICOM.SegmentAlgorithmName", f"SwinUNETR {modelName}")


def showSegmentation(segmentationNode, inputVolume) -> None:
    """Show the segments over the input in the slice views and as surfaces in 3D."""
    segmentationNode.CreateClosedSurfaceRepresentation()
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode:
        displayNode.SetVisibility(True)
    slicer.util.setSliceViewerLayers(background=inputVolume)


def openSegmentEditor(segmentationNode, inputVolume) -> None:
    """Switch to Segment Editor with this segmentation and its volume selected."""
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(segmentationNode)
    if inputVolume:
        editor.setSourceVolumeNode(inputVolume)
