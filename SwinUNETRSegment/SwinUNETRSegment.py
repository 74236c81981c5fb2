import logging
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (
    WithinRange,
    parameterNodeWrapper,
)
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.merge import MergePolicy, summarize
from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL, card_of, download, model_names
from SwinUNETRSegmentSlicer import mrml, panel, qtutils
from SwinUNETRSegmentSlicer.models import (
    ModelCache,
    catalog_models,
    catalog_segmenter,
    devices,
    download_progress,
    weights_url,
)
from SwinUNETRSegmentSlicer.sampledata import registerSampleData
from SwinUNETRSegmentSlicer.selftest import SelfTests
from SwinUNETRSegmentSlicer.worker import CANCELLED, DONE, ERROR, PROGRESS, InferenceJob

#
# SwinUNETRSegment
#


class SwinUNETRSegment(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SwinUNETR Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SwinUNETR Segment contributors"]
        self.parent.helpText = _("""
Segments a scan with a MONAI Swin UNETR model in one click: organs come out as a segmentation
with named, coloured, SNOMED-coded segments on the volume's own grid. Slicer stays responsive
while the model runs; Apply turns into Cancel. Running again into an existing segmentation
adds only what is missing and never overwrites a segment you edited unless you ask for it.
On first use the module offers to install PyTorch (through the PyTorch extension) and MONAI.
""")
        self.parent.acknowledgementText = _("""
Built on MONAI (Project MONAI, Apache-2.0) and the Swin UNETR model of Hatamizadeh et al. and
Tang et al. (CVPR 2022). The sample CT is the CTLiver data set of Slicer's Sample Data
(Medical Segmentation Decathlon, CC-BY-SA 4.0).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# SwinUNETRSegmentParameterNode
#


@parameterNodeWrapper
class SwinUNETRSegmentParameterNode:
    """
    inputVolume - the scan to segment.
    outputSegmentation - where the segments go; None: create a new segmentation each run.
    model - catalog name of the model; device - "auto", "cpu", "cuda:N" or "mps".
    overlap, swBatchSize - sliding-window overlap and windows per batch (set from the model card
      when a model is chosen, and once when the parameter node is created).
    keepModelLoaded - keep the network in memory between runs.
    updateUnedited, replaceEdited - what a run may replace in an existing segmentation.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = DEFAULT_MODEL
    device: str = "auto"
    overlap: Annotated[float, WithinRange(0.0, 0.95)] = 0.5
    swBatchSize: Annotated[int, WithinRange(1, 64)] = 4
    keepModelLoaded: bool = True
    updateUnedited: bool = False
    replaceEdited: bool = False
    modelSettingsApplied: bool = False  # overlap and swBatchSize were set from the model's card


#
# SwinUNETRSegmentWidget
#


class SwinUNETRSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running InferenceJob
        self._run = None  # what the running job writes to, fixed when Apply was clicked
        self._resultNodeID = None  # the last segmentation written, for "Edit in Segment Editor"
        self._resultVolumeID = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SwinUNETRSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SwinUNETRSegmentLogic()

        # The worker thread never touches Qt or MRML: this timer polls its queue on the main thread.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollJob)

        choices = [(name, card.title, panel.model_tooltip(card)) for name, card in self.logic.availableModels()]
        qtutils.fillComboBox(self.ui.modelComboBox, choices)
        self.fillDeviceComboBox()
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()  # its nodes are going away: nothing will be written
        self._resultNodeID = None
        self.ui.segmentEditorButton.enabled = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.modelSettingsApplied and self._parameterNode.model in model_names():
            self.applyModelSettings()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        """Model and device selectors (not connected through connectGui) and the Apply button."""
        p = self._parameterNode
        if not p:
            return
        if not qtutils.selectComboData(self.ui.deviceComboBox, p.device):
            p.device = "auto"  # e.g. a scene saved on a machine with another GPU
        if qtutils.selectComboData(self.ui.modelComboBox, p.model):
            self.ui.modelInfoLabel.text = panel.model_summary(self.logic.modelCard(p.model))
        elif self.ui.modelComboBox.count:
            p.model = self.ui.modelComboBox.itemData(0)  # a model this machine does not have
        if self._job is None:
            self.ui.applyButton.enabled = bool(p.inputVolume)
            self.ui.applyButton.toolTip = (
                _("Segment the input volume.") if p.inputVolume else _("Select an input volume.")
            )

    def fillDeviceComboBox(self) -> None:
        """Devices torch sees here (only "Automatic" until torch is installed)."""
        found = None
        try:
            found = devices()
        except Exception as exc:  # a broken torch install must not break the panel
            logging.warning(f"SwinUNETRSegment: cannot list devices: {exc}")
        qtutils.fillComboBox(self.ui.deviceComboBox, panel.device_choices(found))
        self.updateGuiFromParameterNode()

    def onModelChanged(self, index) -> None:
        name = self.ui.modelComboBox.itemData(index)
        if self._parameterNode and name and name != self._parameterNode.model:
            self._parameterNode.model = name
            self.applyModelSettings()

    def applyModelSettings(self) -> None:
        """The Advanced settings follow the model's card."""
        p = self._parameterNode
        card = self.logic.modelCard(p.model)
        p.overlap = min(card.overlap, 0.95)
        p.swBatchSize = min(max(card.sw_batch_size, 1), 64)
        p.modelSettingsApplied = True

    def onDeviceChanged(self, index) -> None:
        if self._parameterNode and self.ui.deviceComboBox.itemData(index):
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    # ---- running ------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Apply starts a run off the GUI thread; while it runs the same button cancels it."""
        if self._job is not None:
            self._job.cancel()
            self.ui.applyButton.enabled = False
            self.ui.applyButton.text = _("Cancelling...")
            return
        p = self._parameterNode
        if self.logic.usesCatalogModels:
            from SwinUNETRSegmentSlicer.install import ensureDependencies

            if not qtutils.guarded(
                _("Cannot install what the module needs."), ensureDependencies, self.resourcePath("requirements.txt")
            ):
                return
            if self.ui.deviceComboBox.count == 1:
                self.fillDeviceComboBox()  # torch was just installed
        url = self.logic.weightsToDownload(p.model)
        if url and not slicer.util.confirmOkCancelDisplay(
            _("The weights of this model are not on this computer yet. Download them now from {url}?").format(url=url),
            windowTitle=_("SwinUNETR Segment: download model"),
        ):
            return
        job = qtutils.guarded(
            _("Cannot start the segmentation."),
            self.logic.startSegmentation,
            p.inputVolume,
            p.model,
            p.device,
            p.overlap,
            p.swBatchSize,
            p.keepModelLoaded,
            bool(url),
        )
        if not job:
            return
        self._job = job
        self._run = {
            "inputVolumeID": p.inputVolume.GetID(),
            "outputSegmentationID": p.outputSegmentation.GetID() if p.outputSegmentation else None,
            "policy": MergePolicy(update_unedited=p.updateUnedited, replace_edited=p.replaceEdited),
            "keepModelLoaded": p.keepModelLoaded,
        }
        self.setRunning(True)
        self._pollTimer.start()

    def onPollJob(self) -> None:
        """Main thread, every 100 ms while a run is going: show progress, then write or report."""
        if self._job is None:
            self._pollTimer.stop()
            return
        for event in self._job.poll():
            if event.kind == PROGRESS:
                self.ui.progressBar.value = panel.progress_percent(event.value)
                self.ui.statusLabel.text = panel.progress_text(event.value)
            elif event.kind == DONE:
                self._pollTimer.stop()
                self.ui.statusLabel.text = panel.STAGE_TEXT["writing"]
                # Let the label repaint before the (main-thread) MRML update starts.
                qt.QTimer.singleShot(50, lambda result=event.value: self.writeResult(result))
            elif event.kind == CANCELLED:
                self.endRun(_("Cancelled. Nothing was changed."))
            elif event.kind == ERROR:
                self.endRun(_("Failed: {reason}").format(reason=event.value))
                qtutils.showError(_("Segmentation failed."), event.value, event.detail)

    def writeResult(self, result) -> None:
        run = self._run
        if self._job.cancel_event.is_set():  # Cancel clicked after the last window
            self.endRun(_("Cancelled. Nothing was changed."))
            return
        inputVolume = slicer.mrmlScene.GetNodeByID(run["inputVolumeID"])
        if inputVolume is None:
            self.endRun(_("The input volume was removed while the model ran. Nothing was written."))
            return
        output = slicer.mrmlScene.GetNodeByID(run["outputSegmentationID"]) if run["outputSegmentationID"] else None
        written = qtutils.guarded(
            _("Cannot write the segments."), self.logic.writeResult, result, inputVolume, output, run["policy"]
        )
        if written:
            segmentationNode, steps = written
            self._resultNodeID, self._resultVolumeID = segmentationNode.GetID(), inputVolume.GetID()
            self.ui.progressBar.value = 100
            self.endRun(panel.finished_text(summarize(steps), self._job.elapsed, str(result.device)))
        else:
            self.endRun(_("Nothing was written."))

    def endRun(self, message: str) -> None:
        self._pollTimer.stop()
        keep = self._run is None or self._run["keepModelLoaded"]
        self._job = None
        self._run = None
        if not keep:
            self.logic.releaseModel()  # the network goes with the finished job; give its memory back
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(f"SwinUNETR Segment: {message}", 5000)
        self.setRunning(False)

    def setRunning(self, running: bool) -> None:
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
            self.ui.advancedCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = (
            _("Stop after the sliding window that is running; nothing is written.")
            if running
            else _("Segment the input volume.")
        )
        self.ui.applyButton.enabled = True
        self.ui.progressBar.visible = running or self.ui.progressBar.value == 100
        if running:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
        self.ui.segmentEditorButton.enabled = not running and self._resultNodeID is not None
        self.updateGuiFromParameterNode()

    def onOpenSegmentEditor(self) -> None:
        node = slicer.mrmlScene.GetNodeByID(self._resultNodeID) if self._resultNodeID else None
        if node:
            mrml.openSegmentEditor(node, slicer.mrmlScene.GetNodeByID(self._resultVolumeID))

    def isRunning(self) -> bool:
        return self._job is not None


#
# SwinUNETRSegmentLogic
#


class SwinUNETRSegmentLogic(ScriptedLoadableModuleLogic):
    """Runs a model on a volume node and writes a segmentation node; usable without the GUI:

        logic = SwinUNETRSegmentLogic()
        segmentationNode = logic.process(volumeNode, None, model="btcv", device="auto")

    :param segmenterFactory: ``factory(model, device, overlap, swBatchSize)`` returning an
      object with the :class:`SwinUNETRSegmentLib.engine.Segmenter` interface. None: the
      catalog's models (needs torch and MONAI). Tests pass stand-ins.
    """

    def __init__(self, segmenterFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.models = ModelCache(segmenterFactory or catalog_segmenter)
        self._cards = {}
        self.lastMergeSteps = []

    @property
    def usesCatalogModels(self) -> bool:
        return self.models.factory is catalog_segmenter

    def getParameterNode(self):
        return SwinUNETRSegmentParameterNode(super().getParameterNode())

    def modelCard(self, name):
        if name not in self._cards:
            self._cards[name] = card_of(name)
        return self._cards[name]

    def availableModels(self):
        """[(name, card)] of the catalog models that load."""
        found = catalog_models()
        self._cards.update(found)
        return found

    def weightsToDownload(self, model):
        """The URL of ``model``'s weights when they are not on this machine yet, else None."""
        return weights_url(self.modelCard(model)) if self.usesCatalogModels else None

    def releaseModel(self) -> None:
        """Forget the model kept loaded and give its GPU memory back."""
        self.models.release()

    def startSegmentation(
        self,
        inputVolume,
        model=DEFAULT_MODEL,
        device="auto",
        overlap=None,
        swBatchSize=None,
        keepModelLoaded=True,
        downloadWeights=False,
    ):
        """Start the model on a worker thread (downloading its weights first if asked);
        returns the :class:`InferenceJob`.

        The volume is copied here, on the main thread; the worker sees only the copy.
        """
        if not inputVolume:
            raise UserError("select an input volume")
        volume = mrml.volumeFromNode(inputVolume)
        models = self.models
        segmenter = None if downloadWeights else models.get(model, device, overlap, swBatchSize, keep=keepModelLoaded)

        def work(progress, cancel):
            if downloadWeights:
                download(model, progress=download_progress(progress, cancel))
            current = segmenter or models.get(model, device, overlap, swBatchSize, keep=keepModelLoaded)
            return current.segment(volume, progress=progress, cancel=cancel)

        return InferenceJob(work).start()

    def writeResult(self, result, inputVolume, outputSegmentation=None, policy=MergePolicy(), show=True):
        """Write a run's labels; returns (segmentation node, merge steps). Main thread only."""
        if outputSegmentation is None:
            outputSegmentation = mrml.createSegmentationNode(inputVolume, f"{inputVolume.GetName()} {result.card.name}")
        steps = mrml.writeSegments(outputSegmentation, result, inputVolume, policy)
        self.lastMergeSteps = steps
        if show:
            mrml.showSegmentation(outputSegmentation, inputVolume)
        return outputSegmentation, steps

    def process(
        self,
        inputVolume,
        outputSegmentation=None,
        model=DEFAULT_MODEL,
        device="auto",
        overlap=None,
        swBatchSize=None,
        updateUnedited=False,
        replaceEdited=False,
        keepModelLoaded=True,
        showResult=True,
        downloadWeights=True,
    ):
        """Segment ``inputVolume`` and write into ``outputSegmentation`` (None: a new node); returns the node.

        Blocks until done (scripts and tests); the widget runs the same steps off the GUI thread.
        Missing weights are downloaded first when ``downloadWeights`` (the GUI asks instead).
        """
        fetch = downloadWeights and bool(self.weightsToDownload(model))
        job = self.startSegmentation(inputVolume, model, device, overlap, swBatchSize, keepModelLoaded, fetch)
        final = job.wait()[-1]
        if final.kind == ERROR:
            raise final.value
        if final.kind != DONE:
            raise RuntimeError("segmentation cancelled")
        policy = MergePolicy(update_unedited=updateUnedited, replace_edited=replaceEdited)
        return self.writeResult(final.value, inputVolume, outputSegmentation, policy, show=showResult)[0]


#
# SwinUNETRSegmentTest
#


class SwinUNETRSegmentTest(SelfTests, ScriptedLoadableModuleTest):
    """Runs the Apply path on a synthetic scan: segment names, geometry, a second run that keeps
    an edited segment, Apply/Cancel on the panel, and the real engine when torch is installed.
    The test methods are in SwinUNETRSegmentSlicer/selftest.py."""

    logicClass = SwinUNETRSegmentLogic
