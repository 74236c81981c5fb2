"""First-use installation inside Slicer, always after asking.

1. torch through the PyTorch extension's PyTorchUtils (it picks the CUDA or CPU build that
   fits the machine), the Slicer convention;
2. the pinned requirements of ``Resources/requirements.txt`` with
   ``slicer.packaging.pip_ensure`` (Slicer 5.12 and newer), else ``slicer.util.pip_install``,
   with a pip constraints file that keeps torch and the packages Slicer ships (numpy,
   SimpleITK, vtk) exactly as they are.

What to install is decided by :mod:`SwinUNETRSegmentLib.requirements`, without Slicer.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile

import slicer
from slicer.i18n import tr as _

from SwinUNETRSegmentLib.requirements import (
    TORCH_REQUIREMENT,
    constraints_text,
    installed_version,
    plan_install,
    read_requirements,
    torch_problem,
)

REQUESTER = "SwinUNETR Segment"


def ensureDependencies(requirementsPath: str) -> bool:
    """True when torch and every requirement are installed (installing them if the user agrees)."""
    if torch_problem() is not None and not installTorch():
        return False
    plan = plan_install(read_requirements(requirementsPath))
    if plan.refused:
        logging.warning(
            f"{REQUESTER}: not installing {', '.join(plan.refused)}: Slicer or the PyTorch extension provides them"
        )
    if not plan.packages:
        return True
    with tempfile.TemporaryDirectory(prefix="SwinUNETRSegment-") as folder:
        constraintsPath = os.path.join(folder, "constraints.txt")
        with open(constraintsPath, "w", encoding="utf-8") as f:
            f.write(constraints_text(plan))
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:  # Slicer before 5.12
            packaging = None
        pipEnsure = getattr(packaging, "pip_ensure", None)
        if pipEnsure is not None:
            try:
                pipEnsure(list(plan.packages), constraints=constraintsPath, requester=REQUESTER)
            except RuntimeError as exc:  # the user said no
                logging.info(f"{REQUESTER}: {exc}")
                return False
        else:
            if not slicer.util.confirmOkCancelDisplay(
                plan.message(), windowTitle=_("{requester}: install Python packages").format(requester=REQUESTER)
            ):
                return False
            slicer.util.pip_install(list(plan.packages) + ["-c", constraintsPath])
    return plan_install(read_requirements(requirementsPath)).nothing_to_do


def installTorch() -> bool:
    """Offer to install torch through PyTorchUtils; True when a usable torch is installed after."""
    problem = torch_problem()
    if problem is None:
        return True
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            _(
                "SwinUNETR Segment needs PyTorch. Install the 'PyTorch' extension in the Extensions Manager, "
                "restart Slicer and click Apply again."
            )
        )
        return False
    if installed_version("torch") is not None:  # installed, but too old for MONAI
        slicer.util.errorDisplay(
            _(
                "{problem}. Update it in the PyTorch Utils module (uninstall, restart Slicer, install), "
                "then click Apply again."
            ).format(problem=problem)
        )
        return False
    if not slicer.util.confirmOkCancelDisplay(
        _(
            "SwinUNETR Segment needs PyTorch ({requirement}), which is not installed.\n\n"
            "Install it now with the PyTorch extension? It picks the build for this computer's GPU and "
            "downloads up to a few GB; this can take several minutes."
        ).format(requirement=TORCH_REQUIREMENT),
        windowTitle=_("{requester}: install PyTorch").format(requester=REQUESTER),
    ):
        return False
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT[len("torch") :]
    )
    return torch is not None and torch_problem() is None
