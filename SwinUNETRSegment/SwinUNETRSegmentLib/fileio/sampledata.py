"""Real example CT for tests, the demo and the built-in model's training.

The totalsegmentator 2.18.0 source archive (Apache-2.0) carries real CT in
``tests/reference_files``: ``example_ct.nii.gz`` (abdomen, 3 mm) with TotalSegmentator's
own label maps of it, and a 20-slice JPEG 2000 DICOM series of another patient with its
label map. The labels are TotalSegmentator's output, not hand-drawn: pseudo-labels.
``pip download`` fetches the archive once into a cache; nothing else leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import atomic_write_text

__all__ = ["TS_VERSION", "TS_MEMBERS", "TOTALSEG_TO_BTCV", "DEMO_PAIRS", "cache_dir", "reference_files",
           "write_demo_datalist"]

TS_VERSION = "2.18.0"
TS_MEMBERS = (
    "tests/reference_files/example_ct.nii.gz",
    "tests/reference_files/example_ct_sm.nii.gz",
    "tests/reference_files/example_seg.nii.gz",
    "tests/reference_files/example_seg_fast_force_split.nii.gz",
    "tests/reference_files/example_ct_dicom/",
    "tests/reference_files/example_seg_dicom.nii.gz",
)

#: TotalSegmentator v2 "total" class ids (totalsegmentator/map_to_binary.py) -> BTCV label values.
TOTALSEG_TO_BTCV = {
    1: 1,    # spleen
    2: 2,    # kidney_right
    3: 3,    # kidney_left
    4: 4,    # gallbladder
    15: 5,   # esophagus
    5: 6,    # liver
    6: 7,    # stomach
    52: 8,   # aorta
    63: 9,   # inferior_vena_cava
    64: 10,  # portal_vein_and_splenic_vein
    7: 11,   # pancreas
    8: 12,   # adrenal_gland_right
    9: 13,   # adrenal_gland_left
}

#: (image, pseudo-label) pairs of the built-in model's training data.
DEMO_PAIRS = (
    ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
    ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    ("example_ct_dicom", "example_seg_dicom.nii.gz"),
)


def cache_dir() -> Path:
    """Where the archive is kept: ``SWINUNETR_SAMPLE_CACHE``, else the per-user cache folder."""
    env = os.environ.get("SWINUNETR_SAMPLE_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("swinunetr-segment", appauthor=False)) / "sampledata"


def reference_files(cache: Path | None = None, download: bool = True) -> Path:
    """The folder ``tests/reference_files`` of the archive, downloaded and unpacked once."""
    cache = Path(cache or cache_dir()) / f"totalsegmentator-{TS_VERSION}"
    folder = cache / "tests" / "reference_files"
    marker = cache / (".complete-" + hashlib.sha256("|".join(TS_MEMBERS).encode()).hexdigest()[:12])
    if marker.exists():
        return folder
    archive = cache / f"totalsegmentator-{TS_VERSION}.tar.gz"
    if not archive.exists():
        if not download:
            raise UserError(f"the example CT is not on this machine yet ({archive}); run once with network access")
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-q", f"totalsegmentator=={TS_VERSION}", "-d", str(cache)],
            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900,
        )
        if proc.returncode != 0 or not archive.exists():
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no archive"
            raise UserError(f"cannot fetch the example CT (totalsegmentator {TS_VERSION} source archive) "
                            f"with pip: {last}")
    prefix = f"totalsegmentator-{TS_VERSION}/"
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):]
            if m.isfile() and any(rel.startswith(w) for w in TS_MEMBERS):
                m.name = rel
                if hasattr(tarfile, "data_filter"):
                    tar.extract(m, cache, filter="data")
                else:  # Python < 3.10.12 has no extraction filters
                    tar.extract(m, cache)
    marker.touch()
    return folder


def write_demo_datalist(out_dir: Path, cache: Path | None = None) -> tuple[Path, Path]:
    """The built-in model's datalist (Decathlon JSON) and TotalSegmentator->BTCV label map,
    and ``base_card.json``: the demo card's network, preprocessing, windows and labels
    without its weights or training record (what ``train --card`` starts from)."""
    ref = reference_files(cache)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datalist = {
        "description": "totalsegmentator 2.18.0 tests/reference_files: real CT with TotalSegmentator pseudo-labels",
        "training": [{"image": str(ref / img), "label": str(ref / lab)} for img, lab in DEMO_PAIRS],
        "validation": [{"image": str(ref / "example_ct.nii.gz"),
                        "label": str(ref / "example_seg_fast_force_split.nii.gz")}],
    }
    dl = out_dir / "datalist.json"
    atomic_write_text(dl, json.dumps(datalist, indent=2) + "\n")
    lm = out_dir / "totalseg_to_btcv.json"
    atomic_write_text(lm, json.dumps({str(k): v for k, v in TOTALSEG_TO_BTCV.items()}, indent=2) + "\n")
    from SwinUNETRSegmentLib.models.cards import BUILTIN_CARD_DIR

    base = json.loads((BUILTIN_CARD_DIR / "demo.json").read_text(encoding="utf-8"))
    base["checkpoint"] = {}
    base.pop("training", None)
    atomic_write_text(out_dir / "base_card.json", json.dumps(base, indent=2) + "\n")
    return dl, lm
