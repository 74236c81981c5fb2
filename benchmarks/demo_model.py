"""The built-in model's figures, measured through the command line as a user runs it.

For each of the two example patients (both are training patients, so this is no test of
generalisation): ``swinunetr-segment -i SCAN -o labels.nii.gz`` with the model, then
against TotalSegmentator's pseudo-labels mapped to the BTCV labels:

* Dice per organ and the mean over the organs the pseudo-labels have;
* structures found (of the card's labels);
* each kidney on its own side (the centre of the right kidney on the patient's right of
  the left kidney's, in RAS);
* components over 1 cm^3 of any label below the pelvic brim (the top of the sacrum in the
  pseudo-labels).

    ./dev python benchmarks/demo_model.py                      # the installed demo model
    ./dev python benchmarks/demo_model.py --card run/card.json --checkpoint run/best.pt
    ./dev python benchmarks/demo_model.py --update-card SwinUNETRSegment/.../cards/demo.json

``--update-card`` writes the figures into the card's ``training`` record (``dice``,
``mean_dice``, ``dice_measured``, ``second_patient``), which the README quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.fileio.sampledata import TOTALSEG_TO_BTCV, reference_files
from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.training.metrics import dice_per_label, mean_dice

#: TotalSegmentator v2 "total" ids of the sacrum and S1 (the pelvic brim is their top)
SACRUM = (25, 26)
PATIENTS = (("example_ct", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
            ("example_ct_dicom", "example_ct_dicom", "example_seg_dicom.nii.gz"))


def _centre(mask: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(mask)
    return None if len(idx) == 0 else ijk_to_ras[:3, :3] @ idx.mean(0) + ijk_to_ras[:3, 3]


def measure(scan: Path, truth_path: Path, model_args: list[str], card) -> dict:
    from scipy import ndimage

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "labels.nii.gz"
        entry = "import sys; from SwinUNETRSegmentLib.cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", entry, "-i", str(scan), "-o", str(out), "-q", *model_args]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr.strip())
        labels, _ = read_volume(out)
    ts, _ = read_volume(truth_path)
    lut = np.zeros(256, np.uint8)
    for k, v in TOTALSEG_TO_BTCV.items():
        lut[k] = v
    ts_arr = ts.array.astype(np.int64)
    truth = lut[ts_arr]
    lab = labels.array
    dice = dice_per_label(lab, truth, card.labels)
    by_name = {t.name: t.value for t in card.labels}
    found = [t.name for t in card.labels if np.any(lab == t.value)]
    right = _centre(lab == by_name["right kidney"], labels.ijk_to_ras)
    left = _centre(lab == by_name["left kidney"], labels.ijk_to_ras)
    sides = None if right is None or left is None else bool(right[0] > left[0])
    # below the pelvic brim: RAS z under the top of the sacrum
    sacrum = np.isin(ts_arr, SACRUM)
    islands = []
    if sacrum.any():
        zs = (ts.ijk_to_ras[:3, :3] @ np.argwhere(sacrum).T + ts.ijk_to_ras[:3, 3:4])[2]
        brim = float(zs.max())
        voxel_mm3 = float(abs(np.linalg.det(labels.ijk_to_ras[:3, :3])))
        for t in card.labels:
            comps, n = ndimage.label(lab == t.value, structure=np.ones((3, 3, 3), bool))
            for c in range(1, n + 1):
                idx = np.argwhere(comps == c)
                z = (labels.ijk_to_ras[:3, :3] @ idx.T + labels.ijk_to_ras[:3, 3:4])[2]
                volume_cm3 = len(idx) * voxel_mm3 / 1000
                z_mm = float(np.median(z))
                if volume_cm3 > 1.0 and z_mm < brim:
                    islands.append({"label": t.name, "cm3": round(volume_cm3, 1), "z_mm": round(z_mm, 1)})
    else:
        brim = None
    return {"dice": {k: round(v, 4) for k, v in dice.items()}, "mean_dice": round(mean_dice(dice), 4),
            "found": found, "kidneys_on_their_sides": sides, "pelvic_brim_z_mm": brim,
            "components_over_1cm3_below_pelvic_brim": islands}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--card", help="card JSON (with --checkpoint) instead of --model")
    p.add_argument("--checkpoint")
    p.add_argument("--update-card", help="write the figures into this card's training record")
    args = p.parse_args(argv)
    model_args = ["--card", args.card, "--checkpoint", args.checkpoint] if args.card else ["--model", args.model]
    card = load_card(args.card or args.model)
    ref = reference_files()
    results = {}
    for name, scan, truth in PATIENTS:
        results[name] = r = measure(ref / scan, ref / truth, model_args, card)
        print(f"## {name}: mean Dice {r['mean_dice']:.3f} over {len(r['dice'])} labelled organs, "
              f"{len(r['found'])} of {len(card.labels)} structures found, kidneys on their sides: "
              f"{r['kidneys_on_their_sides']}, components > 1 cm^3 below the pelvic brim: "
              f"{len(r['components_over_1cm3_below_pelvic_brim'])}")
        for organ, d in r["dice"].items():
            print(f"   {organ:32s} {d:.3f}")
        for island in r["components_over_1cm3_below_pelvic_brim"]:
            print(f"   island: {island}")
    print(json.dumps(results))
    if args.update_card:
        path = Path(args.update_card)
        data = json.loads(path.read_text(encoding="utf-8"))
        first, second = results["example_ct"], results["example_ct_dicom"]
        data["training"].update({
            "dice": first["dice"], "mean_dice": first["mean_dice"],
            "dice_measured": "benchmarks/demo_model.py: the command line (swinunetr-segment -i example_ct.nii.gz) "
                             "against the TotalSegmentator pseudo-labels example_seg_fast_force_split.nii.gz mapped "
                             "to BTCV, on the input grid, Dice as training/metrics.py computes it (a label found but "
                             "not in the truth scores 0); example_ct is a training patient",
            "found": first["found"], "kidneys_on_their_sides": first["kidneys_on_their_sides"],
            "components_over_1cm3_below_pelvic_brim": first["components_over_1cm3_below_pelvic_brim"],
            "second_patient": {"scan": "example_ct_dicom", "labels": "example_seg_dicom.nii.gz",
                               "note": "also a training patient; 20 slices: most organs are outside the scan",
                               **second},
        })
        from SwinUNETRSegmentLib.fileio.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
