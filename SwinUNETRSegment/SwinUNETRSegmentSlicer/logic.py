"""The module's logic without Qt (the module file's ``SwinUNETRSegmentLogic`` is this plus
Slicer's ``ScriptedLoadableModuleLogic``): start a run on a volume node, and write its result
into a segmentation node when it comes back. Runs on slicer-core in the tests.

    logic = SwinUNETRSegmentLogic()
    segmentationNode = logic.process(volumeNode, model="demo")   # scripts: waits for the result
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import slicer

from SwinUNETRSegmentLib.errors import CancelledError, UserError
from SwinUNETRSegmentLib.merge import MergePolicy, MergeStep
from SwinUNETRSegmentLib.models.catalog import DEFAULT_MODEL, card_of
from SwinUNETRSegmentLib.service.protocol import JobOptions

from . import mrml
from .controller import CANCELLED, DONE, ERROR, THIS_COMPUTER, Controller, LocalEngines, Where
from .download import WeightsDownload
from .models import offered_models, weights_url


def enginePython() -> str:
    """The Python the engine runs in: PythonSlicer (where torch was installed), else this one."""
    return shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or sys.executable


@dataclass(frozen=True)
class RunRecord:
    """What a run writes to, fixed when Apply was clicked."""

    snapshot: mrml.InputSnapshot
    outputSegmentationId: Optional[str]
    policy: MergePolicy
    model: str
    where: Where


class SegmentationLogic:
    """Runs a model in the engine on a volume node and writes a segmentation node.

    :param controller: the :class:`Controller` (tests pass one on another engine).
    """

    def __init__(self, controller: Optional[Controller] = None) -> None:
        if controller is None:
            python = enginePython()
            controller = Controller(LocalEngines(python=python),
                                    download=lambda model: WeightsDownload(model, python=python))
        self.controller = controller
        self._cards: dict[str, Any] = {}
        self.run: Optional[RunRecord] = None
        self.lastMergeSteps: list[MergeStep] = []

    def modelCard(self, name: str):
        if name not in self._cards:
            self._cards[name] = card_of(name)
        return self._cards[name]

    def availableModels(self):
        """[(name, card)] the panel offers (weights here, or downloadable and verifiable)."""
        found = offered_models()
        self._cards.update(found)
        return found

    def modelNames(self) -> list[str]:
        return [name for name, _ in self.availableModels()]

    def listModels(self, where: Optional[Where] = THIS_COMPUTER):
        """The models to list for ``where``: this computer's [(name, card)] at once; for a server
        None, and its answer comes later as the controller's MODELS event (see :meth:`useModels`);
        for None (no parameter node: a scene closing) none, and a question on its way is dropped."""
        self.controller.listModels(where)
        if where is None:
            return []
        return None if where.server is not None else self.availableModels()

    def useModels(self, answer) -> list:
        """[(name, card)] of a server's answer (a :class:`.servermodels.ModelList`), their cards
        (the server's own) kept for :meth:`modelCard`; the models left out are logged."""
        for why in answer.leftOut:
            logging.warning(f"SwinUNETRSegment: {answer.server}: model {why}")
        self._cards.update(dict(answer.models))
        return list(answer.models)

    def weightsToDownload(self, model: str, where: Where = THIS_COMPUTER) -> Optional[str]:
        """The URL of ``model``'s weights when the local engine needs them downloaded first."""
        return weights_url(self.modelCard(model)) if where.server is None else None

    def startSegmentation(self, inputVolume, outputSegmentation=None, model: str = DEFAULT_MODEL,
                          device: str = "auto", overlap: Optional[float] = None, swBatchSize: Optional[int] = None,
                          keepModelLoaded: bool = True, policy: MergePolicy = MergePolicy(),
                          where: Where = THIS_COMPUTER, downloadWeights: bool = False) -> bool:
        """Copy the input's voxels and geometry and start the run; False when one runs already."""
        if not self.controller.canApply:
            return False
        arrayKji, snapshot = mrml.snapshotInput(inputVolume)
        options = JobOptions(model=model, device=device or "auto", overlap=overlap, sw_batch_size=swBatchSize)
        outputId = outputSegmentation.GetID() if outputSegmentation is not None else None
        self.run = RunRecord(snapshot, outputId, policy, model, where)
        return self.controller.start(arrayKji, snapshot.ijkToRas, options, where,
                                     model if downloadWeights else None, keepModelLoaded)

    def writeResult(self, engineResult, show: bool = True):
        """Write the finished run's labels; returns (segmentation node, merge steps). Main thread.

        The labels go onto the grid the input had at Apply; when the input shows other voxels
        now (a sequence browsed meanwhile), a UserError says so and nothing is written.
        """
        run, self.run = self.run, None
        inputVolume = slicer.mrmlScene.GetNodeByID(run.snapshot.nodeId)
        why = mrml.inputChanged(inputVolume, run.snapshot)
        if why:
            raise UserError(f"{why} while the model ran; nothing was written: run it again")
        result = engineResult.segmentation(run.snapshot.ijkToRas)
        output = slicer.mrmlScene.GetNodeByID(run.outputSegmentationId) if run.outputSegmentationId else None
        if run.outputSegmentationId and output is None:
            raise UserError("the output segmentation was removed while the model ran; nothing was written")
        if output is None:
            output = mrml.createSegmentationNode(inputVolume, f"{inputVolume.GetName()} {result.card.name}")
        steps = mrml.writeSegments(output, result, inputVolume, run.policy, run.snapshot)
        self.lastMergeSteps = steps
        if show:
            mrml.showSegmentation(output)
        return output, steps

    def process(self, inputVolume, outputSegmentation=None, model: str = DEFAULT_MODEL, device: str = "auto",
                overlap: Optional[float] = None, swBatchSize: Optional[int] = None, updateUnedited: bool = False,
                replaceEdited: bool = False, keepModelLoaded: bool = True, where: Where = THIS_COMPUTER,
                showResult: bool = True, downloadWeights: bool = True, timeout: float = 3600.0):
        """Segment ``inputVolume`` into ``outputSegmentation`` (None: a new node); returns the node.

        Waits until done (scripts and tests); the panel runs the same steps from its timer.
        """
        policy = MergePolicy(update_unedited=updateUnedited, replace_edited=replaceEdited)
        fetch = downloadWeights and bool(self.weightsToDownload(model, where))
        if not self.startSegmentation(inputVolume, outputSegmentation, model, device, overlap, swBatchSize,
                                      keepModelLoaded, policy, where, fetch):
            raise UserError("a segmentation is running already")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.controller.tick(0.05):
                if event.kind == DONE:
                    return self.writeResult(event.value, show=showResult)[0]
                if event.kind == ERROR:
                    raise event.value
                if event.kind == CANCELLED:
                    raise CancelledError("segmentation cancelled")
            time.sleep(0.01)
        self.controller.cancel()
        raise UserError(f"the segmentation did not finish within {timeout:g} s")
