"""Checkpoints: known layouts load, anything that does not fit is named, nothing runs code."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import tiny_card

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models.checkpoint import load_model, read_state_dict
from SwinUNETRSegmentLib.models.networks import build_network


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(1)
    return build_network(tiny_card()).state_dict()


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "ddp-module-prefix", "nested-ddp"])
def test_known_layouts_load_every_weight(tmp_path, state, layout):
    sd = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"lr": torch.tensor(0.1)}},
        "ddp-module-prefix": {f"module.{k}": v for k, v in state.items()},
        "nested-ddp": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_dice": 0.8},
    }[layout]
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    model = load_model(tiny_card(), path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_missing_key_is_named(tmp_path, state):
    sd = dict(state)
    key = "out.conv.conv.weight"
    del sd[key]
    torch.save(sd, tmp_path / "w.pt")
    message = rf"missing, e.g. '{key}'.*btcv-tiny-test|btcv-tiny-test.*missing, e.g. '{key}'"
    with pytest.raises(UserError, match=message):
        load_model(tiny_card(), tmp_path / "w.pt")


def test_unexpected_key_is_named(tmp_path, state):
    sd = dict(state)
    sd["extra_head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(UserError, match="extra_head.weight"):
        load_model(tiny_card(), tmp_path / "w.pt")


def test_wrong_shape_names_key_and_card(tmp_path):
    # Weights of a 14-class model under a 5-class card: the head does not fit.
    import dataclasses

    torch.save(build_network(tiny_card()).state_dict(), tmp_path / "w.pt")
    card = tiny_card(network_args={**tiny_card().network_args, "out_channels": 5})
    card = dataclasses.replace(card, labels=card.labels[:4])
    with pytest.raises(UserError) as err:
        load_model(card, tmp_path / "w.pt")
    msg = str(err.value)
    assert "out.conv.conv" in msg and "btcv-tiny-test" in msg and "shape" in msg
    assert "\n" not in msg


def test_feature_size_mismatch_is_refused(tmp_path):
    torch.save(build_network(tiny_card()).state_dict(), tmp_path / "w.pt")
    card = tiny_card(network_args={**tiny_card().network_args, "feature_size": 24})
    with pytest.raises(UserError, match="does not fit model card"):
        load_model(card, tmp_path / "w.pt")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/swinunetr-segment-pwned-by-checkpoint",))


def test_checkpoint_that_runs_code_is_refused_without_running(tmp_path, state):
    import os

    marker = "/tmp/swinunetr-segment-pwned-by-checkpoint"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "payload": _Exploit()}, path)
    with pytest.raises(UserError, match="refusing checkpoint evil.pt"):
        read_state_dict(path)
    assert not os.path.exists(marker)
    # A plain pickle (not a torch zip) is refused the same way.
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(UserError):
        read_state_dict(tmp_path / "evil.pkl")
    assert not os.path.exists(marker)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(UserError, match="cannot read checkpoint notes.pt"):
        read_state_dict(tmp_path / "notes.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(UserError, match="holds no"):
        read_state_dict(tmp_path / "empty.pt")
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")
