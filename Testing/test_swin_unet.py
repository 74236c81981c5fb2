"""The Swin-Unet decoder variant: full-resolution output, SwinUNETR's encoder, it learns."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_card

from SwinUNETRSegmentLib.models.swin_unet import PatchExpanding, SwinUnet, build_swin_encoder


def test_patch_expanding_doubles_each_size_and_moves_channel_groups_to_voxels():
    layer = PatchExpanding(16)
    assert layer(torch.rand(2, 3, 4, 5, 16)).shape == (2, 6, 8, 10, 8)
    # With an identity linear layer, channel p1*4 + p2*2 + p3 of a token lands on voxel (p1, p2, p3) of its 2x2x2 block.
    plain = PatchExpanding(8, scale=2, out_dim=1, norm_layer=torch.nn.Identity)
    with torch.no_grad():
        plain.expand.weight.copy_(torch.eye(8))
    x = torch.zeros(1, 1, 2, 1, 8)
    x[0, 0, 0, 0] = torch.arange(8.0)
    x[0, 0, 1, 0] = torch.arange(8.0) + 100
    out = plain(x)[0, ..., 0]
    assert out.shape == (2, 4, 2)
    for p1 in range(2):
        for p2 in range(2):
            for p3 in range(2):
                assert out[p1, p2, p3] == p1 * 4 + p2 * 2 + p3
                assert out[p1, 2 + p2, p3] == 100 + p1 * 4 + p2 * 2 + p3


def test_encoder_is_swinunetrs_module_for_module():
    card = tiny_card()
    reference = dict(card.network_args)
    swinunetr = {
        k: v.shape for k, v in __import__("monai").networks.nets.SwinUNETR(**reference).swinViT.state_dict().items()
    }
    assert {k: v.shape for k, v in build_swin_encoder(reference).state_dict().items()} == swinunetr
    unet = SwinUnet(**reference)
    assert {
        k[len("swinViT.") :]: v.shape for k, v in unet.state_dict().items() if k.startswith("swinViT.")
    } == swinunetr


@pytest.mark.parametrize("size", [(32, 32, 32), (64, 32, 32), (32, 64, 96)])
def test_output_has_the_input_size(size):
    torch.manual_seed(0)
    net = SwinUnet(in_channels=1, out_channels=3, feature_size=12).eval()
    with torch.no_grad():
        y = net(torch.rand(1, 1, *size))
    assert y.shape == (1, 3, *size)
    assert torch.isfinite(y).all()


def test_sizes_that_are_not_multiples_of_32_are_refused():
    net = SwinUnet(in_channels=1, out_channels=2, feature_size=12)
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.rand(1, 1, 32, 32, 40))


def test_two_training_steps_lower_the_loss():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = SwinUnet(in_channels=1, out_channels=2, feature_size=12, window_size=4)
    x = torch.rand(2, 1, 32, 32, 32)
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    y = (((grid - 16) ** 2).sum(0) < 100).long()[None, None].repeat(2, 1, 1, 1, 1)  # a ball
    x = x * 0.2 + 0.8 * y  # bright where the label is
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):  # two steps, then the loss after them
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    assert losses[2] < losses[0], losses
