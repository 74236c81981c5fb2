"""Self-supervised pretraining: augmentation, the three heads and their losses, steps that
every process skips together, resuming, the ``pretrain`` command on real CT (slow), and
loading its encoder weights for fine-tuning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_card

from SwinUNETRSegmentLib.cli.pretrain import main as pretrain_main
from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models.networks import build_network
from SwinUNETRSegmentLib.training.ssl import data, heads, losses, pretrain, views
from SwinUNETRSegmentLib.training.ssl.encoder import load_encoder_weights


def fast_args(**extra) -> dict:
    """The tiny card's network args with 4^3 attention windows: the same modules and
    names as the real thing, several times faster on a CPU."""
    return {**tiny_card().network_args, "window_size": 4, **extra}


def test_rotation_is_about_the_axial_axis_and_k_is_its_label():
    assert views.axial_plane("RAS") == (0, 1)
    assert views.axial_plane("LPS") == (0, 1)
    assert views.axial_plane("SAR") == (1, 2)
    x = torch.arange(2 * 1 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 4, 3)
    rotated, k = views.rotate_axial(x, torch.tensor([1, 3]))
    assert k.tolist() == [1, 3] and rotated.shape == x.shape
    for z in range(3):  # every axial slice is rotated in its own plane; slices stay where they are
        assert torch.equal(rotated[0, 0, :, :, z], torch.rot90(x[0, 0, :, :, z], 1))
        assert torch.equal(rotated[1, 0, :, :, z], torch.rot90(x[1, 0, :, :, z], 3))
    back, _ = views.rotate_axial(rotated, (4 - k) % 4)
    assert torch.equal(back, x)
    _drawn, k = views.rotate_axial(x, generator=torch.Generator().manual_seed(0))
    assert k.dtype == torch.int64 and set(k.tolist()) <= {0, 1, 2, 3}


def test_cutout_replaces_only_the_masked_voxels():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 32, 32, 32, generator=g)
    cut, mask = views.random_cutout(x, generator=g)
    assert cut.shape == x.shape and mask.shape == (3, 1, 32, 32, 32) and mask.dtype == torch.bool
    assert torch.equal(cut[~mask.expand_as(x)], x[~mask.expand_as(x)])
    fraction = mask.float().mean().item()
    assert 0 < fraction < 0.65  # up to 30% noise plus up to 30% swapped in from another sub-volume
    inputs, k, targets, masks = views.make_views(x, generator=g)
    assert inputs.shape == targets.shape == (6, 1, 32, 32, 32) and k.shape == (6,)
    assert masks.shape == (6, 1, 32, 32, 32)


def test_heads_on_volumes_rotated_by_k_quarter_turns():
    torch.manual_seed(0)
    net = heads.PretrainNetwork(fast_args()).eval()
    volume = torch.rand(1, 1, 32, 32, 32)
    x, k = views.rotate_axial(volume.repeat(4, 1, 1, 1, 1), torch.arange(4))
    assert not torch.equal(x[0], x[1])
    with torch.no_grad():
        out = net(x)
    assert out.rotation.shape == (4, 4)
    assert out.contrastive.shape == (4, 512)
    assert out.reconstruction.shape == x.shape
    loss = losses.rotation_loss(out.rotation, k)
    assert torch.isfinite(loss) and loss > 0
    total, parts = losses.PretrainLoss()(out, k, x)
    assert set(parts) == {"rotation", "contrastive", "reconstruction"}
    assert torch.isclose(total, sum(parts.values()))
    weighted, _ = losses.PretrainLoss(weights=(2.0, 0.0, 0.5))(out, k, x)
    assert torch.isclose(weighted, 2 * parts["rotation"] + 0.5 * parts["reconstruction"])


def test_infonce_of_identical_views_is_lower_than_of_shuffled_views():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 64, generator=g)
    identical = losses.contrastive_loss(z, z.clone(), temperature=0.5)
    shuffled = losses.contrastive_loss(z, z[torch.roll(torch.arange(8), 1)], temperature=0.5)
    assert identical < shuffled
    # Sharper with a lower temperature; no negative to contrast with in a batch of one.
    assert losses.contrastive_loss(z, z.clone(), temperature=0.1) < identical
    assert losses.contrastive_loss(z[:1], z[:1]) == 0


def test_l1_is_zero_for_a_perfect_reconstruction():
    x = torch.rand(2, 1, 8, 8, 8)
    assert losses.reconstruction_loss(x, x.clone()) == 0
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    wrong_outside = x.clone()
    wrong_outside[:, :, 4:] += 1
    assert losses.reconstruction_loss(wrong_outside, x, mask) == 0  # only the cut-out voxels count
    assert torch.isclose(losses.reconstruction_loss(wrong_outside, x), torch.tensor(0.5))


# --------------------------------------------------------------------------------------
# a non-finite loss: every process skips the step together
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_step():
    """A fast pretraining network, its optimizer and loss, and the two views of a sub-volume."""
    torch.manual_seed(0)
    net = heads.PretrainNetwork(fast_args())
    two_views = views.make_views(torch.rand(1, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2), losses.PretrainLoss(), two_views


def test_every_process_skips_the_step_when_one_loss_is_not_finite(small_step):
    """train_step asks every process (all_true) before backward: DDP's backward is an
    all-reduce that a process skipping it alone would leave the others waiting in."""
    net, opt, loss_fn, two_views = small_step
    before = {k: v.clone() for k, v in net.state_dict().items()}
    asked = []

    def another_process_is_not_finite(finite: bool) -> bool:
        asked.append(finite)
        return False

    result = pretrain.train_step(net, opt, loss_fn, two_views, all_true=another_process_is_not_finite)
    assert asked == [True] and math.isfinite(result.loss) and not result.stepped
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # no step here either

    def every_process_agrees(finite: bool) -> bool:
        asked.append(finite)
        return finite

    nan_views = (two_views[0] * float("nan"), *two_views[1:])
    result = pretrain.train_step(net, opt, loss_fn, nan_views, all_true=every_process_agrees)
    assert asked[-1] is False and not result.stepped and math.isnan(result.loss)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    result = pretrain.train_step(net, opt, loss_fn, two_views, all_true=every_process_agrees)
    assert asked[-1] is True and result.stepped
    assert not all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_all_true_is_an_all_reduce_of_the_minimum(monkeypatch):
    """Distributed.all_true: True only when every rank's flag is (the other rank simulated)."""
    import torch.distributed as dist

    from SwinUNETRSegmentLib.training.common import Distributed

    ddp = Distributed("cpu")
    assert ddp.all_true(True) and not ddp.all_true(False)  # one process: its own flag
    ddp.enabled, ddp.world = True, 2
    other = {"flag": 1}

    def all_reduce(tensor, op):
        assert op == dist.ReduceOp.MIN
        tensor.copy_(torch.minimum(tensor, torch.tensor([other["flag"]], dtype=tensor.dtype)))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert ddp.all_true(True) is True and ddp.all_true(False) is False
    other["flag"] = 0
    assert ddp.all_true(True) is False


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two synthetic CT-like scans (6 mm voxels) and the fast tiny card."""
    import numpy as np
    from conftest import make_affine
    from helpers import write_nifti

    from SwinUNETRSegmentLib.geometry import Volume

    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    for n in range(2):
        arr = rng.integers(-100, 250, size=(40, 38, 36)).astype(np.int16)
        write_nifti(Volume(arr, make_affine((6.0, 6.0, 6.0), origin=(n, 0.0, 0.0))), folder / f"ct{n}.nii.gz")
    (folder / "card.json").write_text(json.dumps(tiny_card(network_args=fast_args()).to_json()))
    return folder


def pretrain_argv(folder, out, **options) -> list[str]:
    """The command line of a one-step run; ``options`` override (``lr=1e-2``: ``--lr 0.01``; a list: several values)."""
    settings = {"crop": 32, "batch_size": 2, "epochs": 1, "steps_per_epoch": 1, "lr": 1e-3, "device": "cpu", **options}
    args = ["--data", str(folder), "--card", str(folder / "card.json"), "--out", str(out)]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return args


def test_an_epoch_without_a_finite_step_stops_the_run(scans, tmp_path, monkeypatch):
    forward = losses.PretrainLoss.forward

    def not_finite(self, *args, **kwargs):
        total, parts = forward(self, *args, **kwargs)
        return total * float("nan"), parts

    monkeypatch.setattr(losses.PretrainLoss, "forward", not_finite)
    with pytest.raises(UserError, match="not finite at any step of epoch 1; lower --lr .*another --out"):
        pretrain_main(pretrain_argv(scans, tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.fixture(scope="module")
def pretrained_once(scans, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    assert pretrain_main(pretrain_argv(scans, out)) == 0
    return out


@pytest.mark.parametrize("options, message", [
    ({"lr": 1e-2}, "--lr 0.001, not 0.01"),
    ({"crop": 64}, "--crop 32, not 64"),
    ({"batch_size": 3}, "--batch-size 2, not 3"),
    ({"seed": 4}, "--seed 0, not 4"),
    ({"loss_weights": [1, 1, 2]}, "--loss-weights 1.0 1.0 1.0, not 1.0 1.0 2.0"),
    ({"recon_region": "cutout"}, "--recon-region volume, not cutout"),
    ({"warmup_steps": 5}, "--warmup-steps 0, not 5"),
])
def test_pretrain_resume_with_other_settings_is_refused(scans, pretrained_once, options, message):
    with pytest.raises(UserError, match=message) as err:
        pretrain_main(pretrain_argv(scans, pretrained_once, epochs=2, **options))
    assert "\n" not in str(err.value) and "another --out" in str(err.value)
    assert len((pretrained_once / "log.jsonl").read_text().splitlines()) == 1  # nothing was trained


def test_pretrain_resume_may_change_the_time_limit_and_device(scans, pretrained_once, capsys):
    """--epochs (here: already done), --max-minutes, --device and --no-amp do not block."""
    assert pretrain_main(pretrain_argv(scans, pretrained_once, max_minutes=9, device="auto") + ["--no-amp"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert len((pretrained_once / "log.jsonl").read_text().splitlines()) == 1


@pytest.fixture(scope="module")
def run_files(tmp_path_factory, reference_files):
    """A datalist of the real example CT (no labels), and the fast tiny card."""
    folder = tmp_path_factory.mktemp("pretrain")
    datalist = {"training": [{"image": str(reference_files / "example_ct.nii.gz")},
                             {"image": str(reference_files / "example_ct_sm.nii.gz")}]}
    (folder / "data.json").write_text(json.dumps(datalist))
    card = tiny_card(network_args=fast_args())
    (folder / "card.json").write_text(json.dumps(card.to_json()))
    return folder, card


@pytest.mark.slow
@pytest.mark.network
def test_a_few_steps_on_real_ct_lower_the_total_loss(run_files):
    folder, card = run_files
    fixed, rand = data.transforms(card, 32)
    rand.set_random_state(0)
    scan = fixed({"image": json.loads((folder / "data.json").read_text())["training"][0]["image"]})
    batch = torch.stack([rand(scan)["image"].as_tensor() for _ in range(2)])
    assert batch.shape == (2, 1, 32, 32, 32) and 0 <= batch.min() < batch.max() <= 1  # the card's intensity window
    torch.manual_seed(0)
    two_views = views.make_views(batch, views.axial_plane(card.orientation), torch.Generator().manual_seed(0))
    net = heads.PretrainNetwork(card.network_args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = losses.PretrainLoss()
    steps = [pretrain.train_step(net, opt, loss_fn, two_views) for _ in range(4)]
    totals = [s.loss for s in steps]
    assert all(s.stepped for s in steps) and all(math.isfinite(t) for t in totals)
    assert totals[-1] < totals[0], totals
    assert steps[-1].parts["reconstruction"] < steps[0].parts["reconstruction"]


@pytest.mark.slow
@pytest.mark.network
def test_pretrain_command_resumes_and_its_encoder_loads_into_swinunetr(run_files, tmp_path, capsys):
    folder, card = run_files

    def argv(out, epochs):
        return [str(a) for a in ["--data", folder / "data.json", "--card", folder / "card.json", "--out", out,
                                 "--crop", 32, "--batch-size", 2, "--epochs", epochs, "--steps-per-epoch", 1,
                                 "--lr", 1e-3, "--device", "cpu"]]

    whole = tmp_path / "whole"
    assert pretrain_main(argv(whole, 2)) == 0
    log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    for entry in log:  # each loss logged separately
        assert {"loss", "rotation", "contrastive", "reconstruction", "lr"} <= set(entry)
    last = torch.load(whole / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == 2

    encoder = torch.load(whole / "encoder.pt", weights_only=True)
    net = build_network(card)
    assert set(encoder) == set(net.state_dict()) & {k for k in net.state_dict() if k.startswith("swinViT.")}
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("swinViT.")}
    n = load_encoder_weights(net, whole / "encoder.pt")
    assert n == len(net.swinViT.state_dict())
    for k, v in net.state_dict().items():
        if k.startswith("swinViT."):
            assert torch.equal(v, encoder[k])
        else:
            assert torch.equal(v, before[k])  # decoder and head keep their fresh weights

    # Stopped after one epoch and rerun: the same weights as the uninterrupted run.
    split = tmp_path / "split"
    assert pretrain_main(argv(split, 1)) == 0
    capsys.readouterr()
    assert pretrain_main(argv(split, 2)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert len((split / "log.jsonl").read_text().splitlines()) == 2
    resumed = torch.load(split / "encoder.pt", weights_only=True)
    for k, v in encoder.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6)


def test_batch_of_one_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="contrastive"):
        pretrain_main(["--data", str(tmp_path), "--card", "btcv", "--out", str(tmp_path / "o"), "--batch-size", "1"])
    with pytest.raises(UserError, match="multiple of 32"):
        pretrain_main(["--data", str(tmp_path), "--card", "btcv", "--out", str(tmp_path / "o"), "--crop", "48"])


def test_folder_of_scans_lists_images_not_segmentations(tmp_path):
    for name in ("a.nii.gz", "b.nrrd", "c.seg.nrrd", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dicom").mkdir()
    assert [p.rsplit("/", 1)[-1] for p in data.list_images(tmp_path)] == ["a.nii.gz", "b.nrrd", "dicom"]
    with pytest.raises(UserError, match="no scans"):
        data.list_images(tmp_path / "dicom")


# --------------------------------------------------------------------------------------
# load_encoder_weights
# --------------------------------------------------------------------------------------
def test_encoder_of_a_whole_swinunetr_checkpoint_loads(tiny_checkpoint):
    net = build_network(tiny_card())
    assert load_encoder_weights(net, tiny_checkpoint) == len(net.swinViT.state_dict())
    saved = torch.load(tiny_checkpoint, weights_only=True)
    assert torch.equal(net.swinViT.patch_embed.proj.weight, saved["swinViT.patch_embed.proj.weight"])


def test_research_contributions_checkpoint_layout_loads(tmp_path):
    """SwinUNETR/Pretrain's model_swinvit.pt: {"state_dict": ...}, keys "module."-prefixed
    without "swinViT.", old mlp.fc1/fc2 names, and the heads' weights beside them."""
    torch.manual_seed(3)
    source = build_network(tiny_card()).swinViT.state_dict()
    layout = {"module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
              for k, v in source.items()}
    layout["module.rotation_head.weight"] = torch.zeros(4, 192)
    layout["module.contrastive_head.weight"] = torch.zeros(512, 192)
    torch.save({"epoch": 7, "state_dict": layout}, tmp_path / "model_swinvit.pt")
    torch.manual_seed(4)
    net = build_network(tiny_card())
    assert load_encoder_weights(net, tmp_path / "model_swinvit.pt") == len(source)
    for k, v in net.swinViT.state_dict().items():
        assert torch.equal(v, source[k])


def test_encoder_loading_errors_are_one_line_and_say_what_to_do(tmp_path):
    net = build_network(tiny_card())
    torch.save({"decoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="holds no Swin encoder weights"):
        load_encoder_weights(net, tmp_path / "other.pt")

    bigger = build_network(tiny_card(network_args={**tiny_card().network_args, "feature_size": 24}))
    torch.save({k: v for k, v in bigger.state_dict().items() if k.startswith("swinViT.")}, tmp_path / "fs24.pt")
    needs = r"has shape \(24, 1, 2, 2, 2\) but the network needs \(12, 1, 2, 2, 2\)"
    with pytest.raises(UserError, match=needs) as err:
        load_encoder_weights(net, tmp_path / "fs24.pt")
    assert "\n" not in str(err.value)

    partial = {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.layers1.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="covers .* of the encoder's .* parameters"):
        load_encoder_weights(net, tmp_path / "partial.pt")

    both = {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.")}
    both["patch_embed.proj.bias"] = both["swinViT.patch_embed.proj.bias"]
    torch.save(both, tmp_path / "both.pt")
    with pytest.raises(UserError, match="ambiguous"):
        load_encoder_weights(net, tmp_path / "both.pt")

    with pytest.raises(UserError, match="no Swin encoder"):
        load_encoder_weights(torch.nn.Linear(2, 2), tmp_path / "both.pt")
