"""What must be installed before the Slicer module can run, decided without Slicer.

Inside Slicer, torch comes from the PyTorch extension (its PyTorchUtils module picks the
build that fits the machine's GPU driver) and numpy, SimpleITK and vtk come with Slicer
itself. The module's own pinned requirements (``Resources/requirements.txt``) are
installed with pip, constrained so that pip can neither replace torch nor upgrade
anything Slicer ships. This module computes that plan; the Slicer layer asks the user
and runs pip.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

#: The torch the engine's MONAI needs (monai 1.6.1 declares torch>=2.8.0).
TORCH_REQUIREMENT = "torch>=2.8"

#: Packages never installed or upgraded from the requirements: Slicer ships the first
#: three, the PyTorch extension manages the others.
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch", "torchvision")

VersionLookup = Callable[[str], Optional[str]]


def installed_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name``, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments, blanks and pip options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def is_satisfied(requirement: str, installed: VersionLookup = installed_version) -> bool:
    """True when ``requirement`` holds here (or its environment marker excludes this machine)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return True
    version = installed(req.name)
    return version is not None and req.specifier.contains(version, prereleases=True)


def torch_problem(installed: VersionLookup = installed_version) -> Optional[str]:
    """None when a usable torch is installed, else what is wrong, for the user."""
    version = installed("torch")
    if version is None:
        return "PyTorch is not installed"
    if not is_satisfied(TORCH_REQUIREMENT, installed):
        return f"PyTorch {version} is too old (MONAI needs {TORCH_REQUIREMENT[len('torch') :]})"
    return None


@dataclass(frozen=True)
class InstallPlan:
    """What to install before the first run.

    Attributes:
        torch: None when torch is fine, else the problem ("PyTorch is not installed");
            torch is installed through the PyTorch extension, never by pip here.
        packages: requirement strings pip must install (missing or at another version).
        refused: requirement lines naming a :data:`PROTECTED` package; they are never
            installed, whatever the requirements file says.
        constraints: pins (``numpy==2.4.6``) of the protected packages installed here,
            passed to pip as a constraints file so that no dependency can change them.
    """

    torch: Optional[str]
    packages: tuple[str, ...]
    refused: tuple[str, ...]
    constraints: tuple[str, ...]

    @property
    def nothing_to_do(self) -> bool:
        return self.torch is None and not self.packages

    def message(self) -> str:
        """What will be installed, as a person reads it before saying yes."""
        lines = []
        if self.torch is not None:
            lines.append(f"{self.torch}; it is installed by the PyTorch extension ({TORCH_REQUIREMENT}).")
        if self.packages:
            lines.append(
                "These Python packages will be installed into Slicer's Python: " + ", ".join(self.packages) + "."
            )
        if self.constraints:
            lines.append("Slicer's own packages stay as they are: " + ", ".join(self.constraints) + ".")
        return "\n".join(lines) if lines else "Everything needed is installed."


def plan_install(requirements: Iterable[str], installed: VersionLookup = installed_version) -> InstallPlan:
    """The install plan for ``requirements`` given what is installed (``installed(name)``)."""
    from packaging.requirements import Requirement

    protected = {_canonical(p) for p in PROTECTED}
    packages, refused = [], []
    for line in requirements:
        req = Requirement(line)
        if _canonical(req.name) in protected:
            refused.append(line)
        elif not is_satisfied(line, installed):
            packages.append(line)
    constraints = []
    for name in PROTECTED:
        version = installed(name)
        if version is not None:
            constraints.append(f"{name}=={version}")
    return InstallPlan(torch_problem(installed), tuple(packages), tuple(refused), tuple(constraints))


def constraints_text(plan: InstallPlan) -> str:
    """The pip constraints file (``-c FILE``) that keeps the protected packages as installed."""
    return "".join(f"{c}\n" for c in plan.constraints)
