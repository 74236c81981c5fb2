"""Slicer self-tests of the module (run inside a Slicer build: ctest, or Reload and Test).

They click the module's own panel as a user does, with the built-in demo model in the local
engine process (PythonSlicer with torch, MONAI and the engine's packages installed; the
tests say so and stop when they are not): Apply on the abdominal CT sample turned oblique
(segments on exactly the volume's grid, in its study, with the card's names and
terminology), Cancel (the scene stays as it was), and a re-run into the same segmentation
that keeps a segment a user edited. The MRML code itself is also tested without Slicer, on
slicer-core (Testing/test_slicer_*.py).
"""

import os
import time

import numpy as np
import slicer
import vtk

from SwinUNETRSegmentLib.merge import STAMP_TAG, mask_stamp
from SwinUNETRSegmentLib.requirements import plan_install, read_requirements

from .mrml import segmentTag


class SelfTests:
    """The module's self-tests, mixed into ``SwinUNETRSegmentTest(SelfTests, ScriptedLoadableModuleTest)``
    in the module file, which sets :attr:`logicClass`. Not a TestCase itself, so that
    unittest's loader finds only the module's test class."""

    logicClass = None
    moduleName = "SwinUNETRSegment"
    model = "demo"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if not self.engineInstalled():
            return
        for test in (self.test_ApplyOnObliqueSample, self.test_CancelLeavesSceneAsItWas,
                     self.test_RerunKeepsEditedSegment):
            self.setUp()
            test()
        slicer.util.getModuleWidget(self.moduleName).logic.controller.releaseEngine()

    # ---- helpers ----------------------------------------------------------------------------
    def engineInstalled(self) -> bool:
        requirements = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Resources", "requirements.txt")
        if not plan_install(read_requirements(requirements)).nothing_to_do:
            self.delayDisplay("torch, MONAI or the engine's packages are not installed in PythonSlicer: "
                              "skipping the engine tests (click Apply once to install them)")
            return False
        return True

    def obliqueSample(self):
        """The module's sample CT, its grid turned 20 degrees about S (an oblique acquisition)."""
        import SampleData

        from .sampledata import registerSampleData

        registerSampleData()
        volume = SampleData.SampleDataLogic().downloadSample("SwinUNETRAbdomenCT")
        self.assertIsNotNone(volume, "the sample CT could not be downloaded")
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
        turn = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(turn @ ijkToRas))
        return volume

    def panelWith(self, volume, outputSegmentation=None, updateUnedited=False):
        slicer.util.selectModule(self.moduleName)
        widget = slicer.util.getModuleWidget(self.moduleName)
        widget.initializeParameterNode()
        p = widget._parameterNode
        p.inputVolume, p.outputSegmentation, p.model, p.runOn = volume, outputSegmentation, self.model, "local"
        p.updateUnedited, p.replaceEdited, p.keepModelLoaded = updateUnedited, False, True
        return widget

    def runApply(self, widget, cancelAfter=None, timeoutSeconds=900):
        """Click Apply and let the event loop run until the run ends (Cancel after ``cancelAfter`` s)."""
        widget.ui.applyButton.click()
        self.assertTrue(widget.isRunning(), widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        start, shown = time.monotonic(), []
        while widget.isRunning() and time.monotonic() - start < timeoutSeconds:
            slicer.app.processEvents()  # the test waits like the event loop would; the module never does this
            shown.append(widget.ui.statusLabel.text)
            if cancelAfter is not None and time.monotonic() - start > cancelAfter:
                widget.ui.applyButton.click()
                cancelAfter = None
            time.sleep(0.02)
        self.assertFalse(widget.isRunning(), "the run did not finish")
        return shown

    def segmentIds(self, node):
        segmentation = node.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    # ---- tests --------------------------------------------------------------------------------
    def test_ApplyOnObliqueSample(self):
        volume = self.obliqueSample()
        widget = self.panelWith(volume)
        shown = self.runApply(widget)
        self.assertIn("Done", widget.ui.statusLabel.text, shown[-5:])
        nodes = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
        self.assertEqual(len(nodes), 1)
        node = nodes[0]
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(node.GetNodeReference(role), volume)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(node)),
                         shNode.GetItemParent(shNode.GetItemByDataNode(volume)))
        names = {label.name for label in widget.logic.modelCard(self.model).labels}
        segmentation = node.GetSegmentation()
        self.assertTrue(self.segmentIds(node), "the demo model found nothing in the abdominal CT")
        for segmentId in self.segmentIds(node):
            segment = segmentation.GetSegment(segmentId)
            self.assertIn(segment.GetName(), names)
            self.assertIn("SCT^", segmentTag(segment, segment.GetTerminologyEntryTagName()))
            # the voxels on the oblique input grid are exactly what the engine wrote
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volume)
            self.assertEqual(mask_stamp(mask), segmentTag(segment, STAMP_TAG))
        self.assertEqual(widget.ui.progressBar.value, 100)
        self.assertTrue(widget.ui.segmentEditorButton.enabled)

    def test_CancelLeavesSceneAsItWas(self):
        volume = self.obliqueSample()
        widget = self.panelWith(volume)
        self.runApply(widget, cancelAfter=0.5)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), 0)
        self.assertIn("Cancelled", widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.applyButton.text, "Apply")

    def test_RerunKeepsEditedSegment(self):
        volume = self.obliqueSample()
        widget = self.panelWith(volume)
        self.runApply(widget)
        node = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")[0]
        segmentation = node.GetSegmentation()
        biggest = max(self.segmentIds(node),
                      key=lambda i: slicer.util.arrayFromSegmentBinaryLabelmap(node, i, volume).sum())
        edited = slicer.util.arrayFromSegmentBinaryLabelmap(node, biggest, volume)
        columns = np.nonzero(edited.any(axis=(0, 1)))[0]
        edited[:, :, : (columns[0] + columns[-1]) // 2] = 0  # a clinician erases half of it
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited, node, biggest, volume)
        before = len(self.segmentIds(node))
        widget = self.panelWith(volume, node, updateUnedited=True)
        self.runApply(widget)
        self.assertIn("Done", widget.ui.statusLabel.text)
        self.assertEqual(len(self.segmentIds(node)), before)
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, biggest, volume), edited)
        kept = {s.name: s.action.value for s in widget.logic.lastMergeSteps}
        self.assertEqual(kept[segmentation.GetSegment(biggest).GetName()], "keep")
