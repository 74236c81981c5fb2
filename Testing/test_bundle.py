"""MONAI bundle import: literal values only, nothing a bundle names is imported or evaluated."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from conftest import tiny_card

from SwinUNETRSegmentLib.cli import main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models import catalog
from SwinUNETRSegmentLib.models.bundle import card_from_bundle, import_bundle
from SwinUNETRSegmentLib.models.networks import build_network

MARKER = "/tmp/swinunetr-segment-bundle-expression-ran"
CHANNELS = {"0": "background", "1": "spleen", "2": "rkid", "3": "lkid", "4": "gall", "5": "eso", "6": "liver",
            "7": "sto",
            "8": "aorta", "9": "IVC", "10": "veins", "11": "pancreas", "12": "rad", "13": "lad"}


def inference_config(feature_size=12):
    return {
        "imports": ["$import glob", "$import os", f"$os.system('touch {MARKER}')"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "roi": [96, 96, 96],
        "network_def": {"_target_": "SwinUNETR", "spatial_dims": 3, "img_size": "$@roi", "in_channels": 1,
                        "out_channels": 14,
                        "feature_size": feature_size, "use_checkpoint": False},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "ITKReader"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -175, "a_max": 250, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": 4, "overlap": 0.5},
        "run": [f"$__import__('os').system('touch {MARKER}')"],
    }


def write_bundle(root, config, feature_size=12, name="Swin UNETR BTCV segmentation"):
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    meta = {"name": name, "version": "0.5.0", "data_type": "nibabel",
            "task": "Multi-organ segmentation (CT)",
            "description": "A pre-trained model for volumetric (3D) multi-organ segmentation from CT image",
            "copyright": "Copyright (c) MONAI Consortium", "references": ["Hatamizadeh et al. Swin UNETR"],
            "network_data_format": {"outputs": {"pred": {"channel_def": CHANNELS}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    card = tiny_card(network_args={**tiny_card().network_args, "feature_size": feature_size})
    torch.save(build_network(card).state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(autouse=True)
def no_marker():
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    yield
    assert not os.path.exists(MARKER), "a bundle expression was executed"


def test_bundle_becomes_a_card_without_running_expressions(tmp_path):
    card = card_from_bundle(write_bundle(tmp_path / "b", inference_config()), name="zoo")
    assert card.name == "zoo" and card.network_args["feature_size"] == 12
    assert card.spacing == (1.5, 1.5, 2.0) and card.orientation == "RAS" and card.interpolation == "bilinear"
    assert (card.intensity["a_min"], card.intensity["a_max"], card.intensity["clip"]) == (-175, 250, True)
    assert card.roi_size == (96, 96, 96) and card.overlap == 0.5 and card.sw_batch_size == 4
    names = [lab.name for lab in card.labels]
    assert names[:3] == ["spleen", "right kidney", "left kidney"] and names[-1] == "left adrenal gland"
    assert card.label(6).type.value == "10200004"  # liver, with Slicer's SNOMED code
    assert card.modality == "CT"


def test_import_installs_card_and_verified_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path / "home"))
    root = write_bundle(tmp_path / "b", inference_config())
    assert main(["models", "import-bundle", str(root), "--name", "zoo"]) == 0
    assert "imported model 'zoo'" in capsys.readouterr().out
    card, weights = catalog.resolve_model("zoo")
    assert weights.read_bytes() == (root / "models" / "model.pt").read_bytes()
    assert card.checkpoint["sha256"] == catalog.file_digest(weights, "sha256")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["network_def"].update(feature_size="$int(12)"), "expression"),
    (lambda c: c["inferer"].update(roi_size="@nowhere"), "not in the config"),
    (lambda c: c["preprocessing"]["transforms"].pop(3), "no Spacingd"),
    (lambda c: c["preprocessing"]["transforms"].append({"_target_": "NormalizeIntensityd", "keys": "image"}),
     "cannot be expressed"),
    (lambda c: c["network_def"].update(_target_="UNet"), "no SwinUNETR"),
])
def test_unreadable_bundles_are_clear_errors(tmp_path, edit, message):
    config = inference_config()
    edit(config)
    with pytest.raises(UserError, match=message):
        card_from_bundle(write_bundle(tmp_path / "b", config))


def test_weights_that_do_not_fit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(tmp_path / "home"))
    config = inference_config(feature_size=24)  # the card says 24, the weights are 12
    root = write_bundle(tmp_path / "b", config, feature_size=12)
    with pytest.raises(UserError, match="does not fit"):
        import_bundle(root)
    assert "swin_unetr_btcv_segmentation" not in catalog.model_names()


def test_a_bundle_whose_name_would_leave_the_catalog_is_refused_unless_renamed(tmp_path, monkeypatch, capsys):
    """metadata.json says ``../x``: the card would go to ``<home>/x.json`` and the weights to
    ``<home>/x/model.pt``; refused with what to do, nothing written; --name imports it."""
    home = tmp_path / "home"
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(home))
    root = write_bundle(tmp_path / "b", inference_config(), name="../x")
    assert main(["models", "import-bundle", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a usable model name" in err and "pass --name NAME" in err
    assert not home.exists() and not (tmp_path / "x.json").exists() and not (tmp_path / "x").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "b/configs/inference.json", "b/configs/metadata.json", "b/models/model.pt"]
    assert main(["models", "import-bundle", str(root), "--name", "../y"]) == 2
    assert "--name '../y' is not a usable model name" in capsys.readouterr().err and not home.exists()
    assert main(["models", "import-bundle", str(root), "--name", "renamed"]) == 0
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()) == [
        "cards/renamed.json", "models/renamed/model.pt"]


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=oct)
def test_imported_card_and_weights_get_the_umask_s_mode(tmp_path, monkeypatch, mask):
    home = tmp_path / "home"
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(home))
    root = write_bundle(tmp_path / "b", inference_config())
    old = os.umask(mask)
    try:
        import_bundle(root, "zoo")
    finally:
        os.umask(old)
    for p in (home / "cards" / "zoo.json", home / "models" / "zoo" / "model.pt"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_import_leaves_no_card_when_the_weights_cannot_be_installed(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("SWINUNETR_SEGMENT_HOME", str(home))
    root = write_bundle(tmp_path / "b", inference_config())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(catalog, "install_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_bundle(root, "zoo")
    assert "zoo" not in catalog.model_names() and not [p for p in home.rglob("*") if p.is_file()]
