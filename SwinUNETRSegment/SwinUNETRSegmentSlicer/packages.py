"""What the module may install into Slicer's Python, decided without Slicer.

Slicer 5.10 ships the packages of :data:`SLICER_PACKAGES` (read from its SuperBuild at the
v5.10.0 tag); the module's requirements (``Resources/requirements.txt``: what the engine
process needs beside torch) must name none of them, and pip runs with a constraints file
that pins every one installed here, so that no dependency can upgrade one either (Slicer's
DICOM plugins import pydicom, for example, before the module is ever used).
"""

from __future__ import annotations

from typing import Iterable

from SwinUNETRSegmentLib.requirements import PROTECTED, VersionLookup, installed_version

#: The Python distributions 3D Slicer 5.10.0 ships (besides Python, VTK, Qt and Slicer itself).
SLICER_PACKAGES = (
    "SimpleITK", "Deprecated", "GitPython", "PyGithub", "PyJWT", "PyNaCl", "certifi", "cffi", "chardet",
    "charset-normalizer", "couchdb", "cryptography", "dicomweb-client", "gitdb", "idna", "numpy", "packaging",
    "pillow", "pip", "pycparser", "pydicom", "pyparsing", "python-dateutil", "requests", "retrying", "scipy",
    "setuptools", "six", "smmap", "typing_extensions", "urllib3", "wheel", "wrapt",
)


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def requirement_name(line: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(line).name


def replaces_slicer_package(requirements: Iterable[str]) -> list[str]:
    """The requirement lines that name a package Slicer ships (or torch, which PyTorchUtils installs)."""
    shipped = {canonical(n) for n in (*SLICER_PACKAGES, *PROTECTED)}
    return [line for line in requirements if canonical(requirement_name(line)) in shipped]


def slicer_constraints(installed: VersionLookup = installed_version) -> list[str]:
    """``name==version`` of every Slicer package and torch installed here, for pip's ``-c``."""
    pins = []
    for name in (*SLICER_PACKAGES, *PROTECTED):
        version = installed(name)
        if version is not None and f"{name}=={version}" not in pins:
            pins.append(f"{name}=={version}")
    return pins
