"""Small Qt helpers of the panel: combo boxes, errors, settings, the views and Segment Editor."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import MutableMapping

import qt
import slicer

from SwinUNETRSegmentLib.errors import UserError


def fillComboBox(combo, items) -> None:
    """Replace ``combo``'s entries by ``items``: (value, label) or (value, label, tooltip); no signals."""
    combo.blockSignals(True)
    combo.clear()
    for item in items:
        combo.addItem(item[1], item[0])
        if len(item) > 2 and item[2]:
            combo.setItemData(combo.count - 1, item[2], qt.Qt.ToolTipRole)
    combo.blockSignals(False)


def selectComboData(combo, value) -> bool:
    """Select the entry whose data is ``value`` without emitting signals; False when there is none."""
    index = combo.findData(value)
    if index < 0:
        return False
    if index != combo.currentIndex:
        combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(False)
    return True


def showError(message: str, exc: BaseException, detail: str = "") -> None:
    """A UserError in one line (it says what to do); anything else with its traceback."""
    if isinstance(exc, UserError):
        slicer.util.errorDisplay(f"{message}\n\n{exc}")
    else:
        logging.error(f"{message}\n{detail}")
        slicer.util.errorDisplay(f"{message}\n\n{exc}", detailedText=detail)


def guarded(message: str, func, *args):
    """``func(*args)``; on an exception shows ``message`` with it and returns None."""
    try:
        return func(*args)
    except Exception as exc:
        showError(message, exc, traceback.format_exc())
        return None


class SettingsStore(MutableMapping):
    """Slicer's application settings (``qt.QSettings``) as a mapping of strings."""

    def __init__(self):
        self._settings = qt.QSettings()

    def __getitem__(self, key):
        if not self._settings.contains(key):
            raise KeyError(key)
        return self._settings.value(key)

    def __setitem__(self, key, value):
        self._settings.setValue(key, value)

    def __delitem__(self, key):
        self._settings.remove(key)

    def __iter__(self):
        return iter(self._settings.allKeys())

    def __len__(self):
        return len(self._settings.allKeys())


def tokenFilePath() -> str:
    """``SwinUNETRSegment/server-tokens.json`` in the folder of the user's Slicer settings."""
    return os.path.join(os.path.dirname(qt.QSettings().fileName()), "SwinUNETRSegment", "server-tokens.json")


def showInViews(inputVolume) -> None:
    slicer.util.setSliceViewerLayers(background=inputVolume)


def openSegmentEditor(segmentationNode, inputVolume) -> None:
    """Switch to Segment Editor with this segmentation and its volume selected."""
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(segmentationNode)
    if inputVolume:
        editor.setSourceVolumeNode(inputVolume)
