"""What Slicer 5.10's own Python can import: every Slicer-side module of the extension loads,
and the panel's data (model list, default model, weights URL) is built, in a subprocess
whose import system refuses every package that is not in Slicer 5.10's list
(../shared/data/slicer-5.10-python.txt; SwinUNETRSegmentSlicer.packages holds the same
names). Slicer's application modules (slicer, qt, ctk, vtk, SampleData, PyTorchUtils) are
stand-ins there; torch and MONAI are never imported. Also: the sample data registers with
Slicer 5.10's SampleData API, which has no registerCustomSampleDataCategory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_slicer_support import MODULE_DIR, ROOT

from SwinUNETRSegmentSlicer.packages import SLICER_PACKAGES, canonical

SLICER_LIST = ROOT.parent / "shared" / "data" / "slicer-5.10-python.txt"

#: Runs in the subprocess: stand-ins for Slicer's application modules, a finder that refuses
#: every top-level module outside the standard library, the extension and Slicer's packages.
HARNESS = r'''
import importlib.abc, importlib.machinery, importlib.metadata, json, os, sys, sysconfig, types

allowed_dists, module_dir, code = json.loads(sys.argv[1])
APP = {"slicer", "qt", "ctk", "vtk", "PythonQt", "SampleData", "PyTorchUtils", "vtkSegmentationCorePython"}
OURS = {"SwinUNETRSegmentLib", "SwinUNETRSegmentSlicer", "SwinUNETRSegment"}
allowed = set(sys.stdlib_module_names) | OURS | {"_distutils_hack", "pkg_resources", "_cffi_backend"}
for top, dists in importlib.metadata.packages_distributions().items():
    if any(d.lower().replace("_", "-") in allowed_dists for d in dists):
        allowed.add(top)
refused = []
STDLIB = [os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")]


def in_stdlib(top):
    """Private standard library modules (_sysconfigdata_...) are not in sys.stdlib_module_names."""
    spec = importlib.machinery.PathFinder.find_spec(top)
    origin = os.path.realpath(spec.origin) if spec is not None and spec.origin else ""
    return bool(origin) and "site-packages" not in origin and any(origin.startswith(d) for d in STDLIB)


class Anything:
    """Whatever Slicer's application would hand out: callable, subclassable, any attribute."""
    def __init__(self, *args, **kwargs): pass
    def __call__(self, *args, **kwargs): return Anything()
    def __getattr__(self, name): return Anything()
    def __mro_entries__(self, bases): return (object,)
    def __bool__(self): return False


class Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything()


def base(name):
    return type(name, (), {"__init__": lambda self, *a, **k: None})


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in APP:
            return importlib.machinery.ModuleSpec(name, StubLoader(), is_package=True)
        if top not in allowed and not in_stdlib(top):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
            refused.append([name, frame.f_code.co_filename if frame is not None else "?"])
            raise ModuleNotFoundError(f"{name} is not in Slicer 5.10's Python", name=name)
        return None


class StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = Stub(spec.name)
        module.__path__ = []
        if spec.name == "slicer.ScriptedLoadableModule":
            names = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                     "ScriptedLoadableModuleTest"]
            for n in names:
                setattr(module, n, base(n))
            module.__all__ = names
        if spec.name == "slicer.util":
            module.VTKObservationMixin = base("VTKObservationMixin")
        if spec.name == "slicer.parameterNodeWrapper":
            module.parameterNodeWrapper = lambda cls: cls
            module.WithinRange = lambda lo, hi: (lo, hi)
        if spec.name == "slicer.i18n":
            module.tr = lambda text: text
            module.translate = lambda context, text: text
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, Refuse())
sys.path.insert(0, module_dir)
exec(code)
json.dump({"refused": refused, "torch": "torch" in sys.modules or "monai" in sys.modules, **RESULT}, sys.stdout)
'''

PANEL = r'''
import importlib, pkgutil
import SwinUNETRSegmentSlicer
for info in pkgutil.iter_modules(SwinUNETRSegmentSlicer.__path__):
    importlib.import_module("SwinUNETRSegmentSlicer." + info.name)
import SwinUNETRSegment  # the module file, as Slicer loads it at startup
from SwinUNETRSegmentLib.models.catalog import card_of
from SwinUNETRSegmentSlicer import models, panel
offered = models.offered_models()
RESULT = {
    "models": [name for name, _ in offered],
    "default": models.default_model(offered),
    "url": models.weights_url(card_of("btcv")),
    "summary": panel.model_summary(card_of("demo")),
    "modules": sorted(m for m in sys.modules if m.startswith("SwinUNETRSegment")),
}
'''


def slicer_distributions() -> set[str]:
    names = set(SLICER_PACKAGES)
    if SLICER_LIST.is_file():  # the list the project keeps beside the checkout
        for line in SLICER_LIST.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            for word in line.split():
                names.add(word.split("==")[0])
    return {canonical(n) for n in names}


def run_restricted(code: str, tmp_path: Path, allowed: set[str]) -> dict:
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_DATA_HOME": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-I", "-c", HARNESS, json.dumps([sorted(allowed), str(MODULE_DIR), code])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_embedded_list_is_slicer_5_10_s():
    if SLICER_LIST.is_file():
        listed = set()
        for line in SLICER_LIST.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                listed.add(canonical(line.split("==")[0]))
        assert {canonical(n) for n in SLICER_PACKAGES} == listed - {"python"}


def test_the_slicer_side_imports_and_builds_the_panel_with_only_slicer_s_packages(tmp_path):
    out = run_restricted(PANEL, tmp_path, slicer_distributions())
    # optional probes of Python's and Slicer's own packages (brotli for urllib3...) may be refused; none of ours
    ours = [(name, where) for name, where in out["refused"] if where.startswith(str(MODULE_DIR))]
    assert ours == [], ours
    assert not out["torch"], "torch or MONAI was imported into Slicer's process"
    assert out["default"] == "demo" and {"demo", "btcv"} <= set(out["models"])
    assert out["url"].startswith("https://") and out["summary"].startswith("CT, 13 structures")
    assert "SwinUNETRSegmentSlicer.mrml" in out["modules"] and "SwinUNETRSegmentSlicer.enginerun" in out["modules"]


def test_sample_data_registers_with_slicer_5_10_s_api(tmp_path):
    code = r'''
calls = []
class SampleDataLogic:  # Slicer 5.10: sources only; categories come from their 'category'
    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileType="VolumeFile", loadFiles=None, loadFileProperties={},
                                       checksums=None):
        calls.append({"category": category, "sampleName": sampleName, "checksums": checksums})
import SampleData
SampleData.SampleDataLogic = SampleDataLogic
import slicer.util
slicer.util.TESTING_DATA_URL = "https://example/"
from SwinUNETRSegmentSlicer.sampledata import registerSampleData
registerSampleData()
RESULT = {"calls": calls}
'''
    out = run_restricted(code, tmp_path, slicer_distributions())
    (call,) = out["calls"]
    assert call["category"] == "SwinUNETR Segment" and call["sampleName"] == "SwinUNETRAbdomenCT"
    assert call["checksums"].startswith("SHA256:")
