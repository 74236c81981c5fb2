"""Small Qt helpers of the panel: filling and selecting combo boxes, showing errors."""

from __future__ import annotations

import logging
import traceback

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
