"""DICOM SEG out (and back in as training labels): every SEG passes dciodvfy, reads back in
highdicom, holds the engine's labels voxel for voxel on the source grid, and each segment's
centre lies where the organ is in the source's patient coordinates (a front-to-back or
left-right mirror fails here)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GRIDS, make_affine
from helpers import write_dicom_series, write_nifti
from test_dicom_support import (
    ORGANS,
    StandIn,
    dciodvfy_errors,
    label_centre_lps,
    organ_volume,
    seg_centres,
)

from SwinUNETRSegmentLib.cli import main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.dicomseg import (
    algorithm_of,
    prepare_sources,
    read_dicom_seg_labels,
    seg_references,
    write_dicom_seg,
)
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.geometry import Volume
from SwinUNETRSegmentLib.models.cards import load_card

SYNTHETIC = [g for g in GRIDS if g[0] in ("oblique", "oblique-flipped", "flipped-lps", "flipped-all",
                                          "permuted-non-ras")]


@pytest.fixture()
def standin(monkeypatch):
    """The CLI's segmenter replaced by the stand-in (the model's card and weights are still resolved)."""
    from SwinUNETRSegmentLib.cli import segment

    made = {}

    def make(args, card, weights):
        made["segmenter"] = StandIn(card, weights)
        return made["segmenter"]

    monkeypatch.setattr(segment, "_segmenter", make)
    return made


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _check_seg(path, card, engine_labels: Volume, kind="BINARY"):
    """dciodvfy clean; highdicom reads it; labels equal voxel for voxel; segment codes from the card."""
    import highdicom as hd

    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(str(path))
    assert seg.segmentation_type.value == kind
    back = read_dicom_seg_labels(path, card, engine_labels)
    assert np.array_equal(back, np.asarray(engine_labels.array))
    present = [int(v) for v in np.unique(engine_labels.array) if v]
    items = [s for s in seg.SegmentSequence if s.SegmentNumber > 0]  # a LABELMAP SEG also describes background (0)
    assert len(items) == len(present)
    for item, value in zip(items, present):
        lab = card.label(value)
        assert item.SegmentLabel == lab.name
        t = item.SegmentedPropertyTypeCodeSequence[0]
        assert (t.CodingSchemeDesignator, t.CodeValue) == (lab.type.scheme, lab.type.value)
        c = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (c.CodingSchemeDesignator, c.CodeValue) == (lab.category.scheme, lab.category.value)
        mods = t.get("SegmentedPropertyTypeModifierCodeSequence") or []
        assert [m.CodeValue for m in mods] == ([lab.type_modifier.value] if lab.type_modifier else [])
        alg = item.SegmentationAlgorithmIdentificationSequence[0]
        assert alg.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert alg.AlgorithmName == card.name and alg.AlgorithmVersion
        assert item.SegmentAlgorithmType == "AUTOMATIC" and len(item.RecommendedDisplayCIELabValue) == 3
    return seg


@pytest.mark.parametrize("grid", SYNTHETIC, ids=[g[0] for g in SYNTHETIC])
def test_synthetic_series_seg_lands_on_the_organs(capsys, tmp_path, grid, standin):
    """Oblique and flipped series through the command line: SEG = engine labels, centres in place."""
    name, spacing, direction, origin = grid
    ct, truth = organ_volume(Volume(np.zeros((40, 36, 30), np.int16), make_affine(spacing, direction, origin)))
    folder = write_dicom_series(ct, tmp_path / "series", series_uid="1.2.826.0.1.3680043.2.1125.7.1")
    out = tmp_path / "result.dcm"
    rc, stdout, err = _run(capsys, ["-i", folder, "-o", out, "-o", tmp_path / "r.nii.gz", "--model", "demo", "-q"])
    assert rc == 0, err
    assert stdout.splitlines()[0] == str(out)
    card = load_card("demo")
    volume, info = read_volume(folder)
    engine = StandIn(card).segment(volume).labels
    seg = _check_seg(out, card, engine)
    import nibabel as nib

    assert np.array_equal(np.asarray(nib.load(tmp_path / "r.nii.gz").dataobj), engine.array)
    centres = seg_centres(out)
    for value, where in truth.items():
        # within a voxel of the sphere's centre; a mirror would put it 2 x 10 mm away
        assert np.linalg.norm(centres[card.label(value).name] - where) < 0.5 * np.linalg.norm(spacing), (name, value)
    series, algorithms = seg_references(seg)
    assert series == {"1.2.826.0.1.3680043.2.1125.7.1"}
    assert algorithms == {(card.name, algorithm_of(card, standin["segmenter"].checkpoint).version)}
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= {str(ds.SOPInstanceUID) for ds in info.dicom} and refs
    source = prepare_sources(info.dicom)[0][0]  # the helper's series has no FrameOfReferenceUID: derived
    assert seg.StudyInstanceUID == info.dicom[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_labelmap_seg_and_a_label_the_organs_miss(tmp_path):
    """LABELMAP on an oblique series; a right kidney of the card that is not found gets no segment."""
    _, spacing, direction, origin = SYNTHETIC[0]
    ct, truth = organ_volume(Volume(np.zeros((40, 36, 30), np.int16), make_affine(spacing, direction, origin)))
    volume, info = read_volume(write_dicom_series(ct, tmp_path / "s"))
    card = load_card("demo")
    labels = StandIn(card).segment(volume).labels
    out = write_dicom_seg(tmp_path / "lm.dcm", labels, card, info.dicom, segmentation_type="labelmap")
    seg = _check_seg(out, card, labels, kind="LABELMAP")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Background", "spleen", "left kidney", "liver"]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    centres = seg_centres(out)
    assert all(np.linalg.norm(centres[card.label(v).name] - truth[v]) < 2.0 for v in ORGANS)


def test_labels_on_another_grid_than_the_series(tmp_path):
    """Labels half a voxel off the source slices: frames placed by their own positions, still valid."""
    _, spacing, direction, origin = SYNTHETIC[0]
    ct, truth = organ_volume(Volume(np.zeros((40, 36, 30), np.int16), make_affine(spacing, direction, origin)))
    _volume, info = read_volume(write_dicom_series(ct, tmp_path / "s"))
    card = load_card("demo")
    moved = Volume(ct.array, ct.ijk_to_ras @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0.5], [0, 0, 0, 1]]))
    labels = StandIn(card).segment(moved).labels
    out = write_dicom_seg(tmp_path / "x.dcm", labels, card, info.dicom)
    _check_seg(out, card, labels)
    centres = seg_centres(out)
    for v in ORGANS:
        assert np.linalg.norm(centres[card.label(v).name] - label_centre_lps(labels, v)) < 1e-3


def test_real_jpeg2000_series(tmp_path, reference_files, capsys, standin):
    """The real CT (JPEG 2000, empty Study/Series/SOP UIDs in the data set) gives a valid SEG
    that references every instance under UIDs that do not change between runs."""
    src = reference_files / "example_ct_dicom"
    out, again = tmp_path / "a.dcm", tmp_path / "b.dcm"
    for o in (out, again):
        rc, _, err = _run(capsys, ["-i", src, "-o", o, "--model", "demo"])
        assert rc == 0, err
    assert "has no StudyInstanceUID" in err
    card = load_card("demo")
    volume, info = read_volume(src)
    engine = StandIn(card).segment(volume).labels
    seg = _check_seg(out, card, engine)
    import highdicom as hd

    other = hd.seg.segread(str(again))
    assert other.StudyInstanceUID == seg.StudyInstanceUID and other.SeriesInstanceUID != seg.SeriesInstanceUID
    sources, notes = prepare_sources(info.dicom)
    assert len(notes) == 2 and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    refs = [r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(refs) == sorted(ds.file_meta.MediaStorageSOPInstanceUID for ds in info.dicom)
    centres = seg_centres(out)
    for value in (1, 6):
        assert np.linalg.norm(centres[card.label(value).name] - label_centre_lps(engine, value)) < 0.5


@pytest.mark.parametrize("uid, kept", [
    ("1.2.826.0.1.3680043.10.543.9999999999999999999999999999999999", True),  # instance UIDs of 64 characters
    ("2.25.329800735698586629295641978511506172918", True),
    ("1.2.826.0.01.3680043.5", False),  # a leading zero: not a DICOM UID
], ids=["long", "2.25", "leading-zero"])
def test_oblique_mr_with_odd_uids(capsys, tmp_path, standin, uid, kept):
    """Valid odd UIDs are referenced as they are; invalid ones are replaced, so the SEG validates."""
    import highdicom as hd
    import pydicom
    from conftest import rotation

    ct, truth = organ_volume(Volume(np.zeros((40, 36, 20), np.int16),
                                    make_affine((1.0, 1.1, 2.0), rotation(0.3, 0.2, 0.1), (1.0, 2.0, 3.0))))
    folder = write_dicom_series(ct, tmp_path / "s", series_uid=uid, modality="MR")
    for p in folder.iterdir():
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = uid[:-1] + "7", uid[:-1] + "8"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        ds.save_as(p)
    out = tmp_path / "r.dcm"
    rc, _, err = _run(capsys, ["-i", folder, "-o", out, "--model", "demo"])
    assert rc == 0, err
    assert "the scan is MR" in err and ("not a valid DICOM UID" in err) != kept
    volume, _info = read_volume(folder)
    card = load_card("demo")
    _check_seg(out, card, StandIn(card).segment(volume).labels)
    seg = hd.seg.segread(str(out))
    assert (seg.StudyInstanceUID == uid[:-1] + "7") == kept
    assert (seg_references(seg)[0] == {uid}) == kept
    centres = seg_centres(out)
    assert all(np.linalg.norm(centres[card.label(v).name] - truth[v]) < 2.0 for v in ORGANS)


def test_not_dicom_input_has_no_series_to_reference(capsys, tmp_path, standin):
    scan = write_nifti(Volume(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    out = tmp_path / "r.dcm"
    rc, _, err = _run(capsys, ["-i", scan, "-o", out, "--model", "demo"])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "no series to reference" in err and not out.exists() and "segmenter" not in standin


def test_nothing_found_is_one_line(capsys, tmp_path, standin):
    ct = Volume(np.full((10, 9, 8), -1000, np.int16), make_affine((2, 2, 2)))
    folder = write_dicom_series(ct, tmp_path / "s")
    rc, _, err = _run(capsys, ["-i", folder, "-o", tmp_path / "r.dcm", "--model", "demo", "-q"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "none of its 13 structures" in err, err
    assert not (tmp_path / "r.dcm").exists()


def test_output_type_dicom_seg_for_a_folder_of_series(capsys, tmp_path, standin):
    scans, results = tmp_path / "scans", tmp_path / "results"
    results.mkdir()
    ct, _ = organ_volume(Volume(np.zeros((40, 36, 12), np.int16), make_affine((1.5, 1.5, 2.5))))
    for n, name in enumerate(("a", "b")):
        write_dicom_series(ct, scans / name, series_uid=f"1.2.826.0.1.3680043.2.1125.9.{n}")
    rc, _, err = _run(capsys, ["-i", scans, "-o", results, "--output-type", "dicom-seg", "--model", "demo", "-q"])
    assert rc == 0, err
    assert sorted(p.name for p in results.iterdir()) == ["a.dcm", "b.dcm"]
    assert standin["segmenter"].calls == 2


# ---------------------------------------------------------------------------------------
# DICOM SEG as training labels
# ---------------------------------------------------------------------------------------
def test_seg_labels_matched_by_snomed_code_onto_another_grid(tmp_path):
    import dataclasses

    _, spacing, direction, origin = SYNTHETIC[0]
    ct, _ = organ_volume(Volume(np.zeros((40, 36, 30), np.int16), make_affine(spacing, direction, origin)))
    volume, info = read_volume(write_dicom_series(ct, tmp_path / "s"))
    card = load_card("demo")
    labels = StandIn(card).segment(volume).labels
    path = write_dicom_seg(tmp_path / "l.dcm", labels, card, info.dicom)
    # a card that numbers and names its labels otherwise: matched by code (left kidney by its modifier)
    renumbered = dataclasses.replace(card, labels=tuple(
        dataclasses.replace(lab, value=14 - lab.value, name=f"x{lab.value}") for lab in card.labels))
    got = read_dicom_seg_labels(path, renumbered, volume)
    assert np.array_equal(got, np.where(labels.array > 0, 14 - labels.array, 0))
    from SwinUNETRSegmentLib.training.labels import read_label  # a datalist's .dcm label goes there

    assert np.array_equal(read_label(path, renumbered, volume), got)
    # a coarser grid of the same space: nearest SEG voxel
    coarse = Volume(np.zeros((20, 18, 15)), volume.ijk_to_ras @ np.diag([2.0, 2.0, 2.0, 1.0]))
    got = read_dicom_seg_labels(path, card, coarse)
    assert np.array_equal(got, labels.array[::2, ::2, ::2])
    # no segment names a label of the card
    other = dataclasses.replace(card, labels=(dataclasses.replace(card.labels[3], name="nothing"),))
    with pytest.raises(UserError, match="matches a label"):
        read_dicom_seg_labels(path, other, volume)
    with pytest.raises(UserError, match="as a DICOM SEG"):
        read_dicom_seg_labels(info.dicom[0].filename, card, volume)


# ---------------------------------------------------------------------------------------
# the built-in model on the real CT (slow: a real network run)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_builtin_model_real_series_seg_where_totalsegmentator_puts_the_organs(capsys, tmp_path, reference_files):
    import nibabel as nib

    from SwinUNETRSegmentLib.fileio.sampledata import TOTALSEG_TO_BTCV

    src = reference_files / "example_ct_dicom"
    out, nii = tmp_path / "r.dcm", tmp_path / "r.nii.gz"
    rc, _, err = _run(capsys, ["-i", src, "-o", out, "-o", nii, "--model", "demo", "-q"])
    assert rc == 0, err
    card = load_card("demo")
    img = nib.load(nii)
    engine = Volume(np.asarray(img.dataobj), img.affine)
    _check_seg(out, card, engine)
    ref = nib.load(reference_files / "example_seg_dicom.nii.gz")
    ref_labels = Volume(np.asarray(ref.dataobj), ref.affine)
    centres = seg_centres(out)
    # the organs the built-in model finds well here (its aorta label lands on the right of the spine
    # in this series: a model error, not geometry; see the card's known_limits)
    for ts, value in TOTALSEG_TO_BTCV.items():
        if value in (1, 6, 7):
            name = card.label(value).name
            assert np.linalg.norm(centres[name] - label_centre_lps(ref_labels, ts)) < 15.0, name
    # a left-right or front-to-back mirror moves the spleen and the liver by 100 mm or more
    assert centres["spleen"][0] > centres["liver"][0] + 100  # spleen on the patient's left (+x in LPS)
