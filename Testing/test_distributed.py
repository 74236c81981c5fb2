"""torchrun with 2 CPU processes (gloo): both ranks train on different scans, rank 0 alone
writes, the result is an ordinary checkpoint and card, and a step one rank cannot take is
skipped by both (slow tier: each case starts two Python processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_card

from SwinUNETRSegmentLib.models.cards import load_card
from SwinUNETRSegmentLib.models.checkpoint import load_model

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).with_name("torchrun")
CLI = Path(sys.executable).with_name("swinunetr-segment")


def torchrun(args: list, cwd: Path, timeout: float = 600, python: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2`` of the CLI (or of a Python script, ``python=True``) with ``args``."""
    assert TORCHRUN.exists() and CLI.exists()
    launch = [] if python else ["--no-python", str(CLI)]
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--standalone", *launch, *(str(a) for a in args)]
    # A session of its own, so that a run that hangs is killed with its workers, not only torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace", cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.network
def test_torchrun_two_cpu_processes_train(tmp_path, reference_files):
    import torch

    (tmp_path / "map.json").write_text(json.dumps({"5": 6, "1": 1, "2": 2, "3": 3}))
    datalist = {"training": [
        {"image": str(reference_files / "example_ct.nii.gz"),
         "label": str(reference_files / "example_seg_fast_force_split.nii.gz")},
        {"image": str(reference_files / "example_ct_sm.nii.gz"), "label": str(reference_files / "example_seg.nii.gz")},
    ]}
    (tmp_path / "data.json").write_text(json.dumps(datalist))
    (tmp_path / "card.json").write_text(json.dumps(tiny_card(overlap=0.0).to_json()))
    out = tmp_path / "run"
    proc = torchrun(["train", "--data", tmp_path / "data.json", "--card", tmp_path / "card.json", "--out", out,
                     "--label-map", tmp_path / "map.json", "--epochs", 1, "--steps-per-epoch", 1,
                     "--crop", 64, 64, 64, "--num-samples", 1, "--device", "cpu"], tmp_path)
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
    assert not any(k.startswith("module.") for k in torch.load(out / "best.pt", weights_only=True))


@pytest.mark.network
def test_torchrun_two_cpu_processes_pretrain(tmp_path, reference_files):
    import torch

    from SwinUNETRSegmentLib.models.networks import build_network
    from SwinUNETRSegmentLib.training.ssl.encoder import load_encoder_weights

    (tmp_path / "data.json").write_text(json.dumps({"training": [
        {"image": str(reference_files / "example_ct.nii.gz")}, {"image": str(reference_files / "example_ct_dicom")}]}))
    (tmp_path / "card.json").write_text(json.dumps(tiny_card().to_json()))
    out = tmp_path / "pre"
    proc = torchrun(["pretrain", "--data", tmp_path / "data.json", "--card", tmp_path / "card.json", "--out", out,
                     "--epochs", 1, "--steps-per-epoch", 1, "--crop", 64, "--batch-size", 2, "--device", "cpu"],
                    tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and len(log[0]["ranks"]) == 2
    assert all(set(r) >= {"rotation", "contrastive", "reconstruction"} for r in log[0]["ranks"])
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pt", "last.pt", "log.jsonl", "pretrain.json"]
    net = build_network(load_card(tmp_path / "card.json"))
    assert load_encoder_weights(net, out / "encoder.pt") == len(net.swinViT.state_dict())
    assert not any(k.startswith("module.") for k in torch.load(out / "encoder.pt", weights_only=True))


#: Rank 1's first loss becomes NaN; then the ordinary command line.
NAN_ON_RANK_1 = '''
import os, sys
from SwinUNETRSegmentLib.training.ssl import losses
forward, calls = losses.PretrainLoss.forward, []
def nan_once_on_rank_1(self, *args, **kwargs):
    total, parts = forward(self, *args, **kwargs)
    calls.append(1)
    return (total * float("nan"), parts) if os.environ["RANK"] == "1" and len(calls) == 1 else (total, parts)
losses.PretrainLoss.forward = nan_once_on_rank_1
from SwinUNETRSegmentLib.cli.pretrain import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_nan_loss_on_one_rank_is_skipped_by_both(tmp_path):
    """Rank 1 cannot take its first step: both ranks skip it (a rank skipping backward alone
    would leave the other waiting in the gradient all-reduce), and the run goes on."""
    import numpy as np
    from conftest import make_affine
    from helpers import write_nifti

    from SwinUNETRSegmentLib.geometry import Volume

    rng = np.random.default_rng(0)
    for n in range(2):
        arr = rng.integers(-100, 250, size=(40, 38, 36)).astype(np.int16)
        write_nifti(Volume(arr, make_affine((6.0, 6.0, 6.0))), tmp_path / f"ct{n}.nii.gz")
    (tmp_path / "card.json").write_text(json.dumps(tiny_card(
        network_args={**tiny_card().network_args, "window_size": 4}).to_json()))
    (tmp_path / "nan_on_rank_1.py").write_text(NAN_ON_RANK_1)
    out = tmp_path / "pre"
    proc = torchrun([tmp_path / "nan_on_rank_1.py", "--data", tmp_path, "--card", tmp_path / "card.json",
                     "--out", out, "--epochs", 1, "--steps-per-epoch", 2, "--crop", 32, "--batch-size", 2,
                     "--device", "cpu"], tmp_path, timeout=300, python=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "every process skipped the step" in proc.stdout
    (entry,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert entry["skipped_steps"] == 1 and np.isfinite(entry["loss"])
    assert all(np.isfinite(r["loss"]) for r in entry["ranks"])


def test_torchrun_splits_a_folder_of_scans(tmp_path, tiny_card_file, tiny_checkpoint):
    import numpy as np
    from conftest import grid_volume
    from helpers import write_nifti

    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    out.mkdir()
    for n in range(3):
        volume = grid_volume((6.0, 6.0, 6.0), np.eye(3), (n, 0, 0), shape=(10, 9, 8), seed=n)
        write_nifti(volume, scans / f"case{n}.nii.gz")
    proc = torchrun(["-i", scans, "-o", out, "--card", tiny_card_file, "--checkpoint", tiny_checkpoint,
                     "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["case0.seg.nrrd", "case1.seg.nrrd", "case2.seg.nrrd"]
    # Each scan was segmented once, by one of the two processes.
    assert sorted(proc.stdout.split()) == sorted(str(out / f"case{n}.seg.nrrd") for n in range(3))
