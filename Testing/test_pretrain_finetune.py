"""Issue 6 end to end: pretrain the encoder on unlabeled real CT, fine-tune a Swin-Unet
decoder card from it, and segment through the command line like any other model."""

from __future__ import annotations

import json

import pytest

from SwinUNETRSegmentLib.cli import main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.read import read_volume
from SwinUNETRSegmentLib.fileio.sampledata import TOTALSEG_TO_BTCV
from SwinUNETRSegmentLib.models.cards import card_from_dict, load_card


def small_card(decoder: str | None = None) -> dict:
    card = load_card("btcv").to_json()
    card["name"] = f"tiny-{decoder or 'unetr'}"
    card["network"]["args"]["feature_size"] = 12
    if decoder:
        card["network"]["decoder"] = decoder
    card["preprocessing"]["spacing"] = [6.0, 6.0, 6.0]
    card["inference"].update(roi_size=[64, 64, 64], overlap=0.0, sw_batch_size=1)
    return card


def test_swin_unet_decoder_in_a_card():
    card = card_from_dict(small_card("swin_unet"))
    assert card.decoder == "swin_unet"
    assert card_from_dict(card.to_json()).decoder == "swin_unet"
    with pytest.raises(UserError, match="decoder 'bogus' is not known"):
        card_from_dict(small_card("bogus"))


@pytest.mark.slow
@pytest.mark.network
def test_pretrain_then_finetune_swin_unet_then_segment(tmp_path, reference_files, capsys):
    ct = reference_files / "example_ct.nii.gz"
    (tmp_path / "card.json").write_text(json.dumps(small_card("swin_unet")))
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in TOTALSEG_TO_BTCV.items()}))
    (tmp_path / "unlabeled.json").write_text(json.dumps({"training": [
        {"image": str(ct)}, {"image": str(reference_files / "example_ct_dicom")}]}))
    (tmp_path / "labeled.json").write_text(json.dumps({"training": [
        {"image": str(ct), "label": str(reference_files / "example_seg_fast_force_split.nii.gz")}]}))

    assert main(["pretrain", "--data", str(tmp_path / "unlabeled.json"), "--card", str(tmp_path / "card.json"),
                 "--out", str(tmp_path / "pre"), "--epochs", "1", "--steps-per-epoch", "1", "--crop", "64",
                 "--batch-size", "2", "--device", "cpu"]) == 0, capsys.readouterr().err
    encoder = tmp_path / "pre" / "encoder.pt"
    assert encoder.is_file()

    assert main(["train", "--data", str(tmp_path / "labeled.json"), "--card", str(tmp_path / "card.json"),
                 "--out", str(tmp_path / "ft"), "--init-encoder", str(encoder),
                 "--label-map", str(tmp_path / "map.json"),
                 "--epochs", "1", "--steps-per-epoch", "1", "--crop", "64", "64", "64", "--num-samples", "1",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "encoder tensors" in out
    trained = json.loads((tmp_path / "ft" / "card.json").read_text())
    assert trained["network"]["decoder"] == "swin_unet" and trained["training"]["init_encoder"] == str(encoder)

    seg = tmp_path / "ct.seg.nrrd"
    assert main(["-i", str(ct), "-o", str(seg), "--card", str(tmp_path / "ft" / "card.json"), "--checkpoint",
                 str(tmp_path / "ft" / "best.pt"), "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    back, _ = read_volume(seg)
    src, _ = read_volume(ct)
    assert back.same_grid(src)
