"""Between MRML nodes and the engine. Imports slicer and vtk, never qt or ctk, so that the
tests run it on slicer-core's real MRML classes; main thread only (it touches the scene).

* :func:`checkInputVolume` refuses what the model cannot segment (labelmaps, vector and
  colour volumes, volumes without voxels) with a :class:`UserError` that says what to pick.
* :func:`snapshotInput` copies a volume node's voxels and geometry when Apply is clicked;
  :func:`inputChanged` tells at the end whether the node still shows those voxels (a
  sequence browsed during the run shows another frame: then nothing is written).
* :func:`writeSegments` puts a run's labels into a segmentation node: one segment per label
  with the card's name, colour and terminology, merged with the segments already there as
  :func:`SwinUNETRSegmentLib.merge.plan_merge` decides, each written segment stamped so that
  the next run can tell whether someone edited it. The labels go in on the grid and under
  the parent transform the input had when Apply was clicked.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import slicer
import vtk

try:  # Slicer's application
    import vtkSegmentationCorePython as vtkSegmentationCore
except ImportError:  # slicer-core (the tests): the same classes in the slicer package
    vtkSegmentationCore = slicer

from SwinUNETRSegmentLib.errors import UserError
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

#: The one volume class the model takes: its subclasses are labelmaps, vector, tensor and diffusion volumes.
SCALAR_VOLUME = "vtkMRMLScalarVolumeNode"


def firstScalarVolume(scene):
    """The first scan in ``scene`` the model can take (never a labelmap or vector volume), or None."""
    for index in range(scene.GetNumberOfNodesByClass(SCALAR_VOLUME)):
        node = scene.GetNthNodeByClass(index, SCALAR_VOLUME)
        if node.GetClassName() == SCALAR_VOLUME and node.GetImageData() is not None:
            return node
    return None


def checkInputVolume(volumeNode) -> None:
    """Raise a UserError unless ``volumeNode`` is a single-channel scalar volume with voxels."""
    if volumeNode is None:
        raise UserError("select an input volume")
    name = volumeNode.GetName()
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise UserError(f"'{name}' is a labelmap (a segmentation), not a scan; select the CT or MR volume")
    if volumeNode.GetClassName() != SCALAR_VOLUME:
        kind = volumeNode.GetClassName().replace("vtkMRML", "").replace("VolumeNode", "").lower() or "other"
        raise UserError(f"'{name}' is a {kind} volume; the model segments single-channel scalar volumes (CT or MR)")
    image = volumeNode.GetImageData()
    if image is None or min(image.GetDimensions()) < 1 or image.GetPointData().GetScalars() is None:
        raise UserError(f"'{name}' holds no voxels; load the scan again")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise UserError(
            f"'{name}' has {components} values per voxel (a colour or vector image); the model needs one "
            "(convert it to a scalar volume in the Vector to Scalar Volume module)"
        )


@dataclass(frozen=True)
class InputSnapshot:
    """The input as it was when Apply was clicked.

    Attributes:
        nodeId: the volume node's ID.
        ijkToRas: its IJK-to-RAS matrix (4x4; the parent transform is not in it).
        transformNodeId: its parent transform node's ID, None when it has none.
        shape: the voxel array's shape, ``(k, j, i)``.
        imageMTime: its image data's modification time then.
        checksum: Adler-32 of its voxels then (compared when the image data was modified since).
    """

    nodeId: str
    ijkToRas: np.ndarray
    transformNodeId: Optional[str]
    shape: tuple
    imageMTime: int
    checksum: int


def ijkToRasOf(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def snapshotInput(volumeNode) -> tuple[np.ndarray, InputSnapshot]:
    """A copy of the voxels (indexed ``[k, j, i]``) and the :class:`InputSnapshot` of ``volumeNode``."""
    checkInputVolume(volumeNode)
    arrayKji = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True, order="C")
    snapshot = InputSnapshot(
        volumeNode.GetID(),
        ijkToRasOf(volumeNode),
        volumeNode.GetTransformNodeID() or None,
        tuple(arrayKji.shape),
        volumeNode.GetImageData().GetMTime(),
        zlib.adler32(memoryview(arrayKji).cast("B")),
    )
    return arrayKji, snapshot


def inputChanged(volumeNode, snapshot: InputSnapshot) -> Optional[str]:
    """Why ``volumeNode`` no longer shows the voxels of ``snapshot`` (None when it still does)."""
    if volumeNode is None or volumeNode.GetScene() is None:
        return "the input volume was removed"
    if (volumeNode.GetTransformNodeID() or None) != snapshot.transformNodeId:
        return "the input volume was moved under another transform"
    if not np.array_equal(ijkToRasOf(volumeNode), snapshot.ijkToRas):
        return "the input volume's geometry changed"
    image = volumeNode.GetImageData()
    if image is None or tuple(slicer.util.arrayFromVolume(volumeNode).shape) != snapshot.shape:
        return "the input volume's voxels changed"
    if image.GetMTime() != snapshot.imageMTime:
        current = np.ascontiguousarray(slicer.util.arrayFromVolume(volumeNode))
        if zlib.adler32(memoryview(current).cast("B")) != snapshot.checksum:
            return "the input volume's voxels changed (another frame of a sequence?)"
    return None


def createSegmentationNode(inputVolume, name: str):
    """A new segmentation on ``inputVolume``'s grid, beside it in the subject hierarchy."""
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name)
    )
    segmentationNode.CreateDefaultDisplayNodes()
    prepareSegmentationNode(segmentationNode, inputVolume)
    placeBeside(segmentationNode, inputVolume)
    return segmentationNode


def placeBeside(node, inputVolume) -> None:
    """Put ``node`` in the subject hierarchy folder (study) of ``inputVolume``."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    volumeItem = shNode.GetItemByDataNode(inputVolume)
    parent = shNode.GetItemParent(volumeItem) if volumeItem else shNode.GetSceneItemID()
    item = shNode.GetItemByDataNode(node)
    if not item:  # Slicer's subject hierarchy plugins make one for every node; bare MRML does not
        item = shNode.CreateItem(parent, node)
    shNode.SetItemParent(item, parent)


def prepareSegmentationNode(segmentationNode, inputVolume) -> None:
    """Make ``segmentationNode`` ready to take labels on ``inputVolume``'s grid.

    An empty segmentation takes the input's parent transform, then the input's grid as its
    reference geometry (in that order: the geometry is computed in the segmentation's own
    frame, so setting it first would count the transform twice), whatever volume it was
    made for before. Raises UserError when it holds segments that are not binary labelmaps
    (for example imported models), which labels cannot be merged into.
    """
    segmentation = segmentationNode.GetSegmentation()
    binaryLabelmap = vtkSegmentationCore.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    empty = segmentation.GetNumberOfSegments() == 0
    if empty:
        segmentationNode.SetSourceRepresentationToBinaryLabelmap()
        segmentationNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
    elif segmentation.GetSourceRepresentationName() != binaryLabelmap:
        raise UserError(
            f"segmentation '{segmentationNode.GetName()}' holds {segmentation.GetSourceRepresentationName()} segments, "
            "not a labelmap; choose 'Create new segmentation' as the output"
        )
    referenceRole = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    if empty or not segmentationNode.GetNodeReference(referenceRole):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
    if not segmentationNode.GetDisplayNode():
        segmentationNode.CreateDefaultDisplayNodes()


def segmentTag(segment, tagName: str) -> Optional[str]:
    value = vtk.reference("")
    return str(value) if segment.GetTag(tagName, value) else None


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
        written = segmentTag(segment, STAMP_TAG)
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
    segmentationNode,
    result: SegmentationResult,
    inputVolume,
    policy: MergePolicy = MergePolicy(),
    snapshot: Optional[InputSnapshot] = None,
) -> list[MergeStep]:
    """Write ``result`` into ``segmentationNode`` as ``policy`` allows; returns what was done per label.

    ``snapshot``: the input as it was when the run started; when given and the input changed
    since (:func:`inputChanged`), a UserError says why and nothing is written.
    """
    if snapshot is not None:
        why = inputChanged(inputVolume, snapshot)
        if why:
            raise UserError(f"{why} while the model ran; nothing was written: run it again")
    labelsKji = np.ascontiguousarray(result.labels.kji())
    if tuple(labelsKji.shape) != tuple(slicer.util.arrayFromVolume(inputVolume).shape):
        raise UserError("the labels are not on the input volume's grid; nothing was written")
    prepareSegmentationNode(segmentationNode, inputVolume)
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
    """Import the voxels of the assigned label values into the assigned segments (created if new),
    on ``inputVolume``'s grid and under its parent transform."""
    labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__SwinUNETRSegment_import__")
    try:
        labelmapNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRasOf(inputVolume)))
        labelmapNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())  # the import maps it over
        slicer.util.updateVolumeFromArray(labelmapNode, labels_for_import(labelsKji, assignments))
        segmentIds = vtk.vtkStringArray()
        for segmentId in segment_id_slots(assignments):
            segmentIds.InsertNextValue(segmentId)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode, segmentIds):
            raise RuntimeError("importing the labels into the segmentation failed")
    finally:
        displayNode = labelmapNode.GetDisplayNode()
        if displayNode is not None:
            slicer.mrmlScene.RemoveNode(displayNode)
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


def exportLabels(segmentationNode, referenceVolume, segmentIds=None) -> np.ndarray:
    """The segments (all, or ``segmentIds``) as one labelmap array ``[k, j, i]`` on
    ``referenceVolume``'s grid, exported by Slicer's segmentations logic; segment ``n`` of
    the list (or of the segmentation) has value ``n + 1``."""
    ids = vtk.vtkStringArray()
    segmentation = segmentationNode.GetSegmentation()
    for segmentId in segmentIds or [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]:
        ids.InsertNextValue(segmentId)
    labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__SwinUNETRSegment_export__")
    try:
        extent = vtkSegmentationCore.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmapNode, referenceVolume, extent):
            raise RuntimeError("exporting the segments failed")
        return np.array(slicer.util.arrayFromVolume(labelmapNode), copy=True)
    finally:
        slicer.mrmlScene.RemoveNode(labelmapNode)


def showSegmentation(segmentationNode) -> None:
    """Show the segments in the slice views and as surfaces in 3D."""
    segmentationNode.CreateClosedSurfaceRepresentation()
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode:
        displayNode.SetVisibility(True)
