"""Slicer self-tests of the module (run inside Slicer: ctest, or Reload and Test).

They drive the same code a user does, on a synthetic oblique, anisotropic scan with two
boxes whose segmentation is known (:mod:`.testing`): the segment names, colours' terminology
and geometry; a second run into the same node that must keep an edited segment; Apply on
the panel (worker thread, queue, timer) and Cancel, which must leave the scene unchanged;
and, when torch and MONAI are installed, the real engine with a network of known output.
"""

import time

import numpy as np
import qt
import slicer
import vtk
import vtkSegmentationCorePython as vtkSegmentationCore

from .models import catalog_segmenter
from .testing import LIVER, SPLEEN, ThresholdSegmenter, expected_labels_kji, oracle_segmenter, synthetic_scan


class SelfTests:
    """The module's self-tests, mixed into ``SwinUNETRSegmentTest(SelfTests, ScriptedLoadableModuleTest)``
    in the module file, which sets :attr:`logicClass`. Not a TestCase itself, so that
    unittest's loader finds only the module's test class."""

    logicClass = None
    moduleName = "SwinUNETRSegment"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_SegmentsNamesAndGeometry,
            self.test_SecondRunKeepsEditedSegment,
            self.test_ApplyButtonRunsOffTheGuiThread,
            self.test_CancelLeavesSceneAsItWas,
            self.test_RealEngine,
        ):
            self.setUp()
            test()

    def addScan(self):
        arrayKji, ijkToRas = synthetic_scan()
        volume = slicer.util.addVolumeFromArray(arrayKji, ijkToRAS=ijkToRas, name="SyntheticCT")
        return volume, expected_labels_kji(arrayKji)

    def standInLogic(self, **kwargs):
        return self.logicClass(segmenterFactory=lambda *args: ThresholdSegmenter(**kwargs))

    def segmentMask(self, segmentationNode, name, volume):
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name)
        self.assertTrue(segmentId, f"no segment named {name}")
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume)

    def test_SegmentsNamesAndGeometry(self):
        volume, expected = self.addScan()
        segmentationNode = self.standInLogic().process(volume)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(
            sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())),
            ["liver", "spleen"],
        )
        self.assertEqual(
            segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()),
            volume,
        )
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(
            shNode.GetItemParent(shNode.GetItemByDataNode(segmentationNode)),
            shNode.GetItemParent(shNode.GetItemByDataNode(volume)),
        )
        for name, value in (("spleen", SPLEEN), ("liver", LIVER)):
            np.testing.assert_array_equal(
                self.segmentMask(segmentationNode, name, volume), (expected == value).astype(np.uint8)
            )
        liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
        self.assertIn("SCT^10200004^Liver", liver.GetTerminology())
        labelmap = vtkSegmentationCore.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentation.GetSegmentIdBySegmentName("liver"), labelmap)
        segmentMatrix, volumeMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(segmentMatrix)
        volume.GetIJKToRASMatrix(volumeMatrix)
        np.testing.assert_allclose(
            slicer.util.arrayFromVTKMatrix(segmentMatrix), slicer.util.arrayFromVTKMatrix(volumeMatrix), atol=1e-6
        )

    def test_SecondRunKeepsEditedSegment(self):
        volume, expected = self.addScan()
        logic = self.standInLogic()
        segmentationNode = logic.process(volume)
        edited = self.segmentMask(segmentationNode, "liver", volume)
        columns = np.nonzero(edited.any(axis=(0, 1)))[0]
        edited[:, :, : (columns[0] + columns[-1]) // 2] = 0  # a clinician erases half the liver
        self.assertTrue(0 < edited.sum() < (expected == LIVER).sum())
        liverId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("liver")
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentationNode, liverId, volume)
        for options in ({}, {"updateUnedited": True}):
            logic.process(volume, segmentationNode, **options)
            self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 2)
            np.testing.assert_array_equal(self.segmentMask(segmentationNode, "liver", volume), edited)
        self.assertEqual({s.name: s.action.value for s in logic.lastMergeSteps}, {"spleen": "replace", "liver": "keep"})
        logic.process(volume, segmentationNode, replaceEdited=True)
        np.testing.assert_array_equal(
            self.segmentMask(segmentationNode, "liver", volume), (expected == LIVER).astype(np.uint8)
        )

    def runApply(self, widget, timeoutSeconds=60):
        """Click Apply and let the event loop run until the run ends; returns the status texts shown meanwhile."""
        widget.ui.applyButton.click()
        self.assertTrue(widget.isRunning())
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        shown, deadline = [], time.monotonic() + timeoutSeconds
        while widget.isRunning() and time.monotonic() < deadline:
            slicer.app.processEvents()  # the test waits like the event loop would; the module never does this
            shown.append(widget.ui.statusLabel.text)
            time.sleep(0.02)
        self.assertFalse(widget.isRunning(), "the run did not finish")
        return shown

    def moduleWidget(self, **standIn):
        """The module's own panel, its logic using a stand-in segmenter (undo with restoreWidget)."""
        slicer.util.selectModule(self.moduleName)
        widget = slicer.util.getModuleWidget(self.moduleName)
        widget.initializeParameterNode()
        widget.logic.releaseModel()
        widget.logic.models.factory = self.standInLogic(**standIn).models.factory
        return widget

    def restoreWidget(self, widget):
        widget.logic.releaseModel()
        widget.logic.models.factory = catalog_segmenter

    def test_ApplyButtonRunsOffTheGuiThread(self):
        volume, _expected = self.addScan()
        widget = self.moduleWidget(windows=5, seconds_per_window=0.2)
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.outputSegmentation = None
        try:
            shown = self.runApply(widget)
        finally:
            self.restoreWidget(widget)
        # the GUI thread kept running while the model did: it showed the windows as they went by
        self.assertTrue(any("window 2 of 5" in text for text in shown), shown[-5:])
        nodes = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
        self.assertEqual(len(nodes), 1)
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertEqual(widget.ui.progressBar.value, 100)
        self.assertTrue(widget.ui.segmentEditorButton.enabled)

    def test_CancelLeavesSceneAsItWas(self):
        volume, _expected = self.addScan()
        widget = self.moduleWidget(windows=50, seconds_per_window=0.1)
        widget._parameterNode.inputVolume = volume
        qt.QTimer.singleShot(500, widget.ui.applyButton.click)  # Cancel, half a second in
        try:
            self.runApply(widget)
        finally:
            self.restoreWidget(widget)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), 0)
        self.assertIn("Cancelled", widget.ui.statusLabel.text)

    def test_RealEngine(self):
        try:
            import monai  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            self.delayDisplay("torch or MONAI not installed: skipping the real-engine run")
            return
        volume, expected = self.addScan()
        segmentationNode = self.logicClass(segmenterFactory=lambda *args: oracle_segmenter()).process(volume)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(
            sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())),
            ["liver", "spleen"],
        )
        for name, value in (
            ("spleen", SPLEEN),
            ("liver", LIVER),
        ):  # MONAI preprocessing, windows and resampling back: exact
            np.testing.assert_array_equal(
                self.segmentMask(segmentationNode, name, volume), (expected == value).astype(np.uint8)
            )
