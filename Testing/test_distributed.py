"""torchrun with 2 CPU processes (gloo): both ranks train on different scans, rank 0 alone
writes, and the result is an ordinary checkpoint and card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_card

from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.models.checkpoint import load_model


@pytest.mark.network
def test_torchrun_two_cpu_processes_train(tmp_path, reference_files):
    torchrun = Path(sys.executable).with_name("torchrun")
    cli = Path(sys.executable).with_name("swinunetr-segment")
    assert torchrun.exists() and cli.exists()
    (tmp_path / "map.json").write_text(json.dumps({"5": 6, "1": 1, "2": 2, "3": 3}))
    datalist = {"training": [
        {"image": str(reference_files / "example_ct.nii.gz"), "label": str(reference_files / "example_seg_fast_force_split.nii.gz")},
        {"image": str(reference_files / "example_ct_sm.nii.gz"), "label": str(reference_files / "example_seg.nii.gz")},
    ]}
    (tmp_path / "data.json").write_text(json.dumps(datalist))
    (tmp_path / "card.json").write_text(json.dumps(tiny_card(overlap=0.0).to_json()))
    out = tmp_path / "run"
    cmd = [str(torchrun), "--nproc_per_node=2", "--standalone", "--no-python", str(cli), "train",
           "--data", str(tmp_path / "data.json"), "--card", str(tmp_path / "card.json"), "--out", str(out),
           "--label-map", str(tmp_path / "map.json"), "--epochs", "1", "--steps-per-epoch", "1", "--crop", "64", "64", "64",
           "--num-samples", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count('"best_mean_dice"') == 1  # one summary, from rank 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1
    ranks = log[0]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["scans"] == [0] and ranks[1]["scans"] == [1]  # different shards
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "card.json", "last.pt", "log.jsonl"]
    trained = load_card(out / "card.json")
    load_model(trained, out / "best.pt")  # an ordinary checkpoint: no DDP "module." prefix needed
    assert not any(k.startswith("module.") for k in __import__("torch").load(out / "best.pt", weights_only=True))
    shutil.rmtree(out)


@pytest.mark.network
def test_torchrun_two_cpu_processes_pretrain(tmp_path, reference_files):
    import torch

    from SwinUNETRSegmentLib.models.checkpoint import build_network
    from SwinUNETRSegmentLib.training.ssl.pretrain import load_encoder_weights

    torchrun = Path(sys.executable).with_name("torchrun")
    cli = Path(sys.executable).with_name("swinunetr-segment")
    (tmp_path / "data.json").write_text(json.dumps({"training": [
        {"image": str(reference_files / "example_ct.nii.gz")}, {"image": str(reference_files / "example_ct_dicom")}]}))
    (tmp_path / "card.json").write_text(json.dumps(tiny_card().to_json()))
    out = tmp_path / "pre"
    cmd = [str(torchrun), "--nproc_per_node=2", "--standalone", "--no-python", str(cli), "pretrain",
           "--data", str(tmp_path / "data.json"), "--card", str(tmp_path / "card.json"), "--out", str(out),
           "--epochs", "1", "--steps-per-epoch", "1", "--crop", "64", "--batch-size", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and len(log[0]["ranks"]) == 2
    assert all(set(r) >= {"rotation", "contrastive", "reconstruction"} for r in log[0]["ranks"])
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pt", "last.pt", "log.jsonl", "pretrain.json"]
    net = build_network(load_card(tmp_path / "card.json"))
    assert load_encoder_weights(net, out / "encoder.pt") == len(net.swinViT.state_dict())
    assert not any(k.startswith("module.") for k in torch.load(out / "encoder.pt", weights_only=True))


def test_torchrun_splits_a_folder_of_scans(tmp_path, tiny_card_file, tiny_checkpoint):
    import numpy as np
    from conftest import grid_volume
    from helpers import write_nifti

    torchrun = Path(sys.executable).with_name("torchrun")
    cli = Path(sys.executable).with_name("swinunetr-segment")
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    out.mkdir()
    for n in range(3):
        write_nifti(grid_volume((6.0, 6.0, 6.0), np.eye(3), (n, 0, 0), shape=(10, 9, 8), seed=n), scans / f"case{n}.nii.gz")
    cmd = [str(torchrun), "--nproc_per_node=2", "--standalone", "--no-python", str(cli), "-i", str(scans), "-o", str(out),
           "--card", str(tiny_card_file), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["case0.seg.nrrd", "case1.seg.nrrd", "case2.seg.nrrd"]
    # Each scan was segmented once, by one of the two processes.
    assert sorted(proc.stdout.split()) == sorted(str(out / f"case{n}.seg.nrrd") for n in range(3))
