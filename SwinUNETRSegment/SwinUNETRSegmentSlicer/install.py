"""First-use installation inside Slicer, always after asking, for the engine process.

The engine process (``swinunetr-segment serve``, run by PythonSlicer) needs torch and what
``Resources/requirements.txt`` lists; Slicer's own process imports neither.

1. torch: the PyTorch extension's way (light-the-torch picks the CUDA or CPU build that
   fits the machine's driver), run as PythonSlicer processes: PyTorchUtils'
   ``installTorch`` would import torch into Slicer's process afterwards, which this module
   never does;
2. the pinned requirements with ``slicer.util.pip_install`` and a constraints file that
   pins torch and every package Slicer ships (:mod:`.packages`) as installed.

The caller (the panel) keeps Apply disabled meanwhile: both steps pump the event loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import slicer
from slicer.i18n import tr as _

from SwinUNETRSegmentLib.requirements import TORCH_REQUIREMENT, installed_version, plan_install, read_requirements

from .packages import replaces_slicer_package, slicer_constraints

REQUESTER = "SwinUNETR Segment"


def pythonSlicer() -> str:
    """The interpreter of Slicer's Python environment (where packages are installed)."""
    return shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or "PythonSlicer"


def runPython(args: list[str]) -> None:
    """``PythonSlicer ARGS`` with its output in Slicer's log (the GUI stays responsive)."""
    proc = slicer.util.launchConsoleProcess([pythonSlicer(), *args])
    slicer.util.logProcessOutput(proc)


def ensureDependencies(requirementsPath: str) -> bool:
    """True when torch and every requirement are installed (installing them if the user agrees)."""
    requirements = read_requirements(requirementsPath)
    refused = replaces_slicer_package(requirements)
    if refused:
        logging.warning(f"{REQUESTER}: not installing {', '.join(refused)}: Slicer or the PyTorch extension provides "
                        "them")
        requirements = [r for r in requirements if r not in refused]
    plan = plan_install(requirements)
    if plan.nothing_to_do:
        return True
    if not slicer.util.confirmOkCancelDisplay(
        plan.message() + "\n\n" + _("This can take several minutes; Slicer stays usable meanwhile."),
        windowTitle=_("{requester}: install Python packages").format(requester=REQUESTER),
    ):
        return False
    if plan.torch is not None and not installTorch(plan.torch):
        return False
    if plan.packages:
        with tempfile.TemporaryDirectory(prefix="SwinUNETRSegment-") as folder:
            constraintsPath = os.path.join(folder, "constraints.txt")
            with open(constraintsPath, "w", encoding="utf-8") as f:
                f.write("".join(f"{pin}\n" for pin in slicer_constraints()))
            slicer.util.pip_install(list(plan.packages) + ["-c", constraintsPath])
    return plan_install(requirements).nothing_to_do


def installTorch(problem: str) -> bool:
    """torch through light-the-torch (the PyTorch extension's installer) in PythonSlicer processes."""
    if installed_version("torch") is not None:  # installed, but too old for MONAI
        slicer.util.errorDisplay(
            _("{problem}. Update it in the PyTorch Utils module (uninstall, restart Slicer, install), "
              "then click Apply again.").format(problem=problem)
        )
        return False
    try:
        import PyTorchUtils

        args = PyTorchUtils.PyTorchUtilsLogic._getPipInstallArguments(None, TORCH_REQUIREMENT[len("torch"):])
    except (ImportError, AttributeError):  # the extension is missing or changed: its documented defaults
        args = ["install", TORCH_REQUIREMENT, "torchvision"]
    if installed_version("light-the-torch") is None:
        slicer.util.pip_install("light-the-torch>=0.5")
    runPython(["-m", "light_the_torch", *args])
    return installed_version("torch") is not None
