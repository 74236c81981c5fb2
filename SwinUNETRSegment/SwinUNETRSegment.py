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

from SwinUNETRSegmentLib.merge import MergePolicy, summarize
from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL
from SwinUNETRSegmentSlicer import mrml, panel, qtutils
from SwinUNETRSegmentSlicer.controller import CANCELLED, DONE, ERROR, INFO, MODELS, PROGRESS, ServerSettings, TokenFile
from SwinUNETRSegmentSlicer.logic import SegmentationLogic
from SwinUNETRSegmentSlicer.qtutils import SettingsStore
from SwinUNETRSegmentSlicer.sampledata import registerSampleData
from SwinUNETRSegmentSlicer.selftest import SelfTests

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
with named, coloured, SNOMED-coded segments on the volume's own grid. The model runs in a
separate engine process (on this computer, or on a server), so Slicer stays responsive;
Apply turns into Cancel. Running again into an existing segmentation adds only what is
missing and never overwrites a segment you edited unless you ask for it. On first use the
module offers to install PyTorch (the PyTorch extension's way) and MONAI for the engine.
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
    inputVolume - the scan to segment. outputSegmentation - where the segments go; None: a new one.
    model - catalog name of the model; device - "auto", "cpu", "cuda:N" or "mps" (of the engine).
    runOn - "local" (an engine process on this computer) or "server" (serverUrl; its token is in
      the application settings, never in the scene).
    overlap, swBatchSize - sliding-window settings (from the model card when a model is chosen).
    keepModelLoaded - keep the engine and its model in memory between runs.
    updateUnedited, replaceEdited - what a run may replace in an existing segmentation.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = DEFAULT_MODEL
    device: str = "auto"
    runOn: str = "local"
    serverUrl: str = ""
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
        self._resultNodeID = None  # the last segmentation written, for "Edit in Segment Editor"
        self._resultVolumeID = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SwinUNETRSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SwinUNETRSegmentLogic()
        self.servers = ServerSettings(SettingsStore(), TokenFile(qtutils.tokenFilePath()))  # tokens: a 0600 file

        # The engine runs in another process; this timer moves the run on a few ms at a time.
        self._timer = qt.QTimer()
        self._timer.setInterval(20)
        self._timer.connect("timeout()", self.onTick)

        qtutils.fillComboBox(self.ui.deviceComboBox, panel.device_choices(None))
        qtutils.fillComboBox(self.ui.runOnComboBox, [("local", _("this computer")), ("server", _("a server"))])
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.runOnComboBox.connect("currentIndexChanged(int)", self.onRunOnChanged)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onTokenEdited)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.refreshModels)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module reload or Slicer closing: cancel the run and stop the local engine (and its model)."""
        self._timer.stop()
        self.logic.controller.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.controller.cancel()  # its nodes are going away: nothing will be written
        self._resultNodeID = None
        self.ui.segmentEditorButton.enabled = False
        self.setParameterNode(None)
        self.refreshModels()  # none until the next scene's parameter node says where runs go

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            firstVolumeNode = mrml.firstScalarVolume(slicer.mrmlScene)  # never a labelmap or vector volume
            if firstVolumeNode:
                p.inputVolume = firstVolumeNode
        if not p.modelSettingsApplied and p.model in self.logic.modelNames():
            self.applyModelSettings()
        self.refreshModels()  # this computer's models, or the server's

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
        """Selectors not connected through connectGui, the server fields and the Apply button."""
        p = self._parameterNode
        if not p:
            return
        if not qtutils.selectComboData(self.ui.deviceComboBox, p.device):
            p.device = "auto"  # e.g. a scene saved on a machine with another GPU
        if qtutils.selectComboData(self.ui.modelComboBox, p.model):
            self.ui.modelInfoLabel.text = panel.model_summary(self.logic.modelCard(p.model))
        elif self.ui.modelComboBox.count:
            p.model = self.ui.modelComboBox.itemData(0)  # a model this machine (or the server) does not offer
            self.applyModelSettings()
        qtutils.selectComboData(self.ui.runOnComboBox, p.runOn)
        remote = p.runOn == "server"
        for widget in (self.ui.serverUrlLabel, self.ui.serverUrlLineEdit, self.ui.serverTokenLabel,
                       self.ui.serverTokenLineEdit):
            widget.visible = remote
        if remote and not self.ui.serverTokenLineEdit.hasFocus():
            self.ui.serverTokenLineEdit.text = self.servers.token(p.serverUrl)
        if not self.logic.controller.running:
            ready = bool(p.inputVolume) and self.logic.controller.canApply and (not remote or bool(p.serverUrl))
            self.ui.applyButton.enabled = ready
            self.ui.applyButton.toolTip = _("Segment the input volume.") if ready else (
                _("Select an input volume.") if not p.inputVolume else
                _("Give the server's URL.") if remote and not p.serverUrl else _("Installing, please wait."))

    def onTokenEdited(self) -> None:
        if self._parameterNode and self._parameterNode.serverUrl:
            self.servers.setToken(self._parameterNode.serverUrl, self.ui.serverTokenLineEdit.text)
            self.refreshModels()

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

    def onRunOnChanged(self, index) -> None:
        if self._parameterNode and self.ui.runOnComboBox.itemData(index):
            self._parameterNode.runOn = self.ui.runOnComboBox.itemData(index)
            self.refreshModels()

    def refreshModels(self) -> None:
        """The model selector: this computer's models, or those the server serves (onTick brings them)."""
        p = self._parameterNode
        models = self.logic.listModels(self.servers.where(p.runOn, p.serverUrl) if p else None)
        self.showModels(models or [], _("Asking the server for its models...") if models is None else "")
        self._timer.start()  # it stops by itself once nothing is on its way

    def showModels(self, models, note: str = "") -> None:
        qtutils.fillComboBox(self.ui.modelComboBox, panel.model_choices(models))
        self.updateGuiFromParameterNode()
        self.ui.modelInfoLabel.text = note or self.ui.modelInfoLabel.text

    # ---- running ------------------------------------------------------------------------
    def where(self):
        """Where this run goes; None when the user said no to sending the scan to the server."""
        where = self.servers.where(self._parameterNode.runOn, self._parameterNode.serverUrl)
        if where.server is not None and self.servers.consent.needed(where.server):
            if not slicer.util.confirmOkCancelDisplay(
                _("The scan will be sent to {url} to be segmented there. Send scans to this server?").format(
                    url=where.server), windowTitle=_("SwinUNETR Segment: send the scan to a server")):
                return None
            self.servers.consent.approve(where.server)
        return where

    def onApplyButton(self) -> None:
        """Apply starts a run in the engine; while it runs the same button cancels it."""
        controller = self.logic.controller
        if controller.running:
            controller.cancel()
            self.ui.applyButton.enabled = False
            self.ui.applyButton.text = _("Cancelling...")
            return
        if not controller.canApply:  # the dependency install pumps events: a second click lands here
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot start the segmentation."), waitCursor=True):
            where = self.where()
            if where is None:
                return
            if where.server is None and not self.installDependencies():
                return
            url = self.logic.weightsToDownload(p.model, where)
            if url and not slicer.util.confirmOkCancelDisplay(
                _("The weights of this model are not on this computer yet. Download them now from {url}?").format(
                    url=url), windowTitle=_("SwinUNETR Segment: download model")):
                return
            policy = MergePolicy(update_unedited=p.updateUnedited, replace_edited=p.replaceEdited)
            if self.logic.startSegmentation(p.inputVolume, p.outputSegmentation, p.model, p.device, p.overlap,
                                            p.swBatchSize, p.keepModelLoaded, policy, where, bool(url)):
                self.setRunning(True)
                self._timer.start()

    def installDependencies(self) -> bool:
        """torch and the engine's packages, Apply disabled meanwhile (the install pumps the event loop)."""
        from SwinUNETRSegmentSlicer.install import ensureDependencies

        self.ui.applyButton.enabled = False
        self.ui.statusLabel.text = _("Checking the Python packages the engine needs...")
        try:
            return self.logic.controller.install(lambda: ensureDependencies(self.resourcePath("requirements.txt")))
        finally:
            self.ui.statusLabel.text = ""
            self.updateGuiFromParameterNode()

    def onTick(self) -> None:
        """Main thread, every 20 ms while a run goes: progress, then write or report."""
        controller = self.logic.controller
        for event in controller.tick():
            if event.kind == PROGRESS:
                self.ui.progressBar.value = controller.percent
                self.ui.statusLabel.text = panel.progress_text(event.value)
            elif event.kind == INFO:
                self.fillDevices(panel.engine_devices(event.value))
            elif event.kind == MODELS:  # the server's answer to refreshModels
                why = event.value.error and _("No model: {reason}").format(reason=event.value.error)
                self.showModels(self.logic.useModels(event.value), why or "")
            elif event.kind == DONE:
                self.ui.statusLabel.text = panel.STAGE_TEXT["writing"]
                self.writeResult(event.value)
            elif event.kind == CANCELLED:
                self.endRun(_("Cancelled. Nothing was changed."))
            elif event.kind == ERROR:
                self.endRun(_("Failed: {reason}").format(reason=event.value))
                qtutils.showError(_("Segmentation failed."), event.value)
        if not controller.busy:
            self._timer.stop()

    def fillDevices(self, devices) -> None:
        if devices and self.ui.deviceComboBox.count != len(devices) + 1:
            qtutils.fillComboBox(self.ui.deviceComboBox, panel.device_choices(devices))
            self.updateGuiFromParameterNode()

    def writeResult(self, engineResult) -> None:
        elapsed = self.logic.controller.elapsed
        written = qtutils.guarded(_("Cannot write the segments."), self.logic.writeResult, engineResult)
        if not written:
            self.endRun(_("Nothing was written."))
            return
        segmentationNode, steps = written
        inputVolume = segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        self._resultNodeID = segmentationNode.GetID()
        self._resultVolumeID = inputVolume.GetID() if inputVolume else None
        qtutils.showInViews(inputVolume)
        self.ui.progressBar.value = 100
        self.endRun(panel.finished_text(summarize(steps), elapsed, engineResult.device))

    def endRun(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(f"SwinUNETR Segment: {message}", 5000)
        self.setRunning(False)

    def setRunning(self, running: bool) -> None:
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = (
            _("Stop the run; nothing is written.") if running else _("Segment the input volume."))
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
            qtutils.openSegmentEditor(node, slicer.mrmlScene.GetNodeByID(self._resultVolumeID))

    def isRunning(self) -> bool:
        return self.logic.controller.running


#
# SwinUNETRSegmentLogic
#


class SwinUNETRSegmentLogic(SegmentationLogic, ScriptedLoadableModuleLogic):
    """Runs a model in the engine process on a volume node and writes a segmentation node;
    usable without the GUI (``logic.process(volumeNode)``). The work is in
    SwinUNETRSegmentSlicer/logic.py (no Qt: tested on slicer-core)."""

    def __init__(self, controller=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self, controller)

    def getParameterNode(self):
        return SwinUNETRSegmentParameterNode(super().getParameterNode())


#
# SwinUNETRSegmentTest
#


class SwinUNETRSegmentTest(SelfTests, ScriptedLoadableModuleTest):
    """Apply on an oblique sample through the local engine, Cancel, and a re-run that keeps an
    edited segment. The test methods are in SwinUNETRSegmentSlicer/selftest.py."""

    logicClass = SwinUNETRSegmentLogic
