"""Self-supervised pretraining: augmentation, the three heads and their losses, the
``pretrain`` command on real CT, and loading its encoder weights for fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_card
from SwinUNETRSegmentLib.training.ssl import pretrain
from SwinUNETRSegmentLib.models.checkpoint import build_network
from SwinUNETRSegmentLib.errors import UserError


def fast_args(**extra) -> dict:
    """The tiny card's network args with 4^3 attention windows: the same modules and
    names as the real thing, several times faster on a CPU."""
    return {**tiny_card().network_args, "window_size": 4, **extra}


def test_rotation_is_about_the_axial_axis_and_k_is_its_label():
    assert pretrain.axial_plane("RAS") == (0, 1)
    assert pretrain.axial_plane("LPS") == (0, 1)
    assert pretrain.axial_plane("SAR") == (1, 2)
    x = torch.arange(2 * 1 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 4, 3)
    rotated, k = pretrain.rotate_axial(x, torch.tensor([1, 3]))
    assert k.tolist() == [1, 3] and rotated.shape == x.shape
    for z in range(3):  # every axial slice is rotated in its own plane; slices stay where they are
        assert torch.equal(rotated[0, 0, :, :, z], torch.rot90(x[0, 0, :, :, z], 1))
        assert torch.equal(rotated[1, 0, :, :, z], torch.rot90(x[1, 0, :, :, z], 3))
    back, _ = pretrain.rotate_axial(rotated, (4 - k) % 4)
    assert torch.equal(back, x)
    _drawn, k = pretrain.rotate_axial(x, generator=torch.Generator().manual_seed(0))
    assert k.dtype == torch.int64 and set(k.tolist()) <= {0, 1, 2, 3}


def test_cutout_replaces_only_the_masked_voxels():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 32, 32, 32, generator=g)
    cut, mask = pretrain.random_cutout(x, generator=g)
    assert cut.shape == x.shape and mask.shape == (3, 1, 32, 32, 32) and mask.dtype == torch.bool
    assert torch.equal(cut[~mask.expand_as(x)], x[~mask.expand_as(x)])
    fraction = mask.float().mean().item()
    assert 0 < fraction < 0.65  # up to 30% noise plus up to 30% swapped in from another sub-volume
    inputs, k, targets, masks = pretrain.make_views(x, generator=g)
    assert inputs.shape == targets.shape == (6, 1, 32, 32, 32) and k.shape == (6,) and masks.shape == (6, 1, 32, 32, 32)


def test_heads_on_volumes_rotated_by_k_quarter_turns():
    torch.manual_seed(0)
    net = pretrain.PretrainNetwork(fast_args()).eval()
    volume = torch.rand(1, 1, 32, 32, 32)
    x, k = pretrain.rotate_axial(volume.repeat(4, 1, 1, 1, 1), torch.arange(4))
    assert not torch.equal(x[0], x[1])
    with torch.no_grad():
        out = net(x)
    assert out.rotation.shape == (4, 4)
    assert out.contrastive.shape == (4, 512)
    assert out.reconstruction.shape == x.shape
    loss = pretrain.rotation_loss(out.rotation, k)
    assert torch.isfinite(loss) and loss > 0
    total, parts = pretrain.PretrainLoss()(out, k, x)
    assert set(parts) == {"rotation", "contrastive", "reconstruction"}
    assert torch.isclose(total, sum(parts.values()))
    weighted, _ = pretrain.PretrainLoss(weights=(2.0, 0.0, 0.5))(out, k, x)
    assert torch.isclose(weighted, 2 * parts["rotation"] + 0.5 * parts["reconstruction"])


def test_infonce_of_identical_views_is_lower_than_of_shuffled_views():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 64, generator=g)
    identical = pretrain.contrastive_loss(z, z.clone(), temperature=0.5)
    shuffled = pretrain.contrastive_loss(z, z[torch.roll(torch.arange(8), 1)], temperature=0.5)
    assert identical < shuffled
    # Sharper with a lower temperature; no negative to contrast with in a batch of one.
    assert pretrain.contrastive_loss(z, z.clone(), temperature=0.1) < identical
    assert pretrain.contrastive_loss(z[:1], z[:1]) == 0


def test_l1_is_zero_for_a_perfect_reconstruction():
    x = torch.rand(2, 1, 8, 8, 8)
    assert pretrain.reconstruction_loss(x, x.clone()) == 0
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    wrong_outside = x.clone()
    wrong_outside[:, :, 4:] += 1
    assert pretrain.reconstruction_loss(wrong_outside, x, mask) == 0  # only the cut-out voxels count
    assert torch.isclose(pretrain.reconstruction_loss(wrong_outside, x), torch.tensor(0.5))


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


@pytest.mark.network
def test_a_few_steps_on_real_ct_lower_the_total_loss(run_files):
    folder, card = run_files
    fixed, rand = pretrain.transforms(card, 32)
    rand.set_random_state(0)
    scan = fixed({"image": json.loads((folder / "data.json").read_text())["training"][0]["image"]})
    batch = torch.stack([rand(scan)["image"].as_tensor() for _ in range(2)])
    assert batch.shape == (2, 1, 32, 32, 32) and 0 <= batch.min() < batch.max() <= 1  # the card's intensity window
    torch.manual_seed(0)
    views = pretrain.make_views(batch, pretrain.axial_plane(card.orientation), torch.Generator().manual_seed(0))
    net = pretrain.PretrainNetwork(card.network_args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = pretrain.PretrainLoss()
    losses = [pretrain.train_step(net, opt, loss_fn, views) for _ in range(4)]
    totals = [total for total, _ in losses]
    assert all(torch.isfinite(torch.tensor(t)) for t in totals)
    assert totals[-1] < totals[0], totals
    assert losses[-1][1]["reconstruction"] < losses[0][1]["reconstruction"]


@pytest.mark.network
def test_pretrain_command_resumes_and_its_encoder_loads_into_swinunetr(run_files, tmp_path, capsys):
    folder, card = run_files

    def argv(out, epochs):
        return [str(a) for a in ["--data", folder / "data.json", "--card", folder / "card.json", "--out", out, "--crop", 32,
                                 "--batch-size", 2, "--epochs", epochs, "--steps-per-epoch", 1, "--lr", 1e-3, "--device", "cpu"]]

    whole = tmp_path / "whole"
    assert pretrain.main(argv(whole, 2)) == 0
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
    n = pretrain.load_encoder_weights(net, whole / "encoder.pt")
    assert n == len(net.swinViT.state_dict())
    for k, v in net.state_dict().items():
        if k.startswith("swinViT."):
            assert torch.equal(v, encoder[k])
        else:
            assert torch.equal(v, before[k])  # decoder and head keep their fresh weights

    # Stopped after one epoch and rerun: the same weights as the uninterrupted run.
    split = tmp_path / "split"
    assert pretrain.main(argv(split, 1)) == 0
    capsys.readouterr()
    assert pretrain.main(argv(split, 2)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert len((split / "log.jsonl").read_text().splitlines()) == 2
    resumed = torch.load(split / "encoder.pt", weights_only=True)
    for k, v in encoder.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6)


def test_batch_of_one_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="contrastive"):
        pretrain.main(["--data", str(tmp_path), "--card", "btcv", "--out", str(tmp_path / "o"), "--batch-size", "1"])
    with pytest.raises(UserError, match="multiple of 32"):
        pretrain.main(["--data", str(tmp_path), "--card", "btcv", "--out", str(tmp_path / "o"), "--crop", "48"])


def test_folder_of_scans_lists_images_not_segmentations(tmp_path):
    for name in ("a.nii.gz", "b.nrrd", "c.seg.nrrd", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dicom").mkdir()
    assert [p.rsplit("/", 1)[-1] for p in pretrain.list_images(tmp_path)] == ["a.nii.gz", "b.nrrd", "dicom"]
    with pytest.raises(UserError, match="no scans"):
        pretrain.list_images(tmp_path / "dicom")


# --------------------------------------------------------------------------------------
# load_encoder_weights
# --------------------------------------------------------------------------------------
def test_encoder_of_a_whole_swinunetr_checkpoint_loads(tiny_checkpoint):
    net = build_network(tiny_card())
    assert pretrain.load_encoder_weights(net, tiny_checkpoint) == len(net.swinViT.state_dict())
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
    assert pretrain.load_encoder_weights(net, tmp_path / "model_swinvit.pt") == len(source)
    for k, v in net.swinViT.state_dict().items():
        assert torch.equal(v, source[k])


def test_encoder_loading_errors_are_one_line_and_say_what_to_do(tmp_path):
    net = build_network(tiny_card())
    torch.save({"decoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="holds no Swin encoder weights"):
        pretrain.load_encoder_weights(net, tmp_path / "other.pt")

    bigger = build_network(tiny_card(network_args={**tiny_card().network_args, "feature_size": 24}))
    torch.save({k: v for k, v in bigger.state_dict().items() if k.startswith("swinViT.")}, tmp_path / "fs24.pt")
    with pytest.raises(UserError, match=r"has shape \(24, 1, 2, 2, 2\) but the network needs \(12, 1, 2, 2, 2\)") as err:
        pretrain.load_encoder_weights(net, tmp_path / "fs24.pt")
    assert "\n" not in str(err.value)

    partial = {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.layers1.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="covers .* of the encoder's .* parameters"):
        pretrain.load_encoder_weights(net, tmp_path / "partial.pt")

    both = {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.")}
    both["patch_embed.proj.bias"] = both["swinViT.patch_embed.proj.bias"]
    torch.save(both, tmp_path / "both.pt")
    with pytest.raises(UserError, match="ambiguous"):
        pretrain.load_encoder_weights(net, tmp_path / "both.pt")

    with pytest.raises(UserError, match="no Swin encoder"):
        pretrain.load_encoder_weights(torch.nn.Linear(2, 2), tmp_path / "both.pt")
