"""Model cards: the built-in btcv card says what the model-zoo bundle does; bad cards are named."""

from __future__ import annotations

import json

import pytest

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models.cards import builtin_card_names, card_from_dict, load_card

BTCV_ORGANS = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
]


def test_btcv_card_matches_the_model_zoo_bundle():
    card = load_card("btcv")
    assert "btcv" in builtin_card_names()
    assert card.network == "SwinUNETR"
    assert card.network_args["in_channels"] == 1
    assert card.network_args["out_channels"] == 14
    assert card.network_args["feature_size"] == 48
    assert card.orientation == "RAS"
    assert card.spacing == (1.5, 1.5, 2.0)
    assert card.interpolation == "bilinear"
    intensity = card.intensity
    assert (intensity["a_min"], intensity["a_max"], intensity["b_min"], intensity["b_max"]) == (-175, 250, 0, 1)
    assert card.intensity["clip"] is True
    assert card.roi_size == (96, 96, 96) and card.overlap == 0.5
    assert [lab.name for lab in card.labels] == BTCV_ORGANS
    assert [lab.value for lab in card.labels] == list(range(1, 14))
    assert card.checkpoint["md5"] == "50dd67a01b28a1d5487fd9ac27e682fb"


def test_btcv_terminology_is_snomed_as_slicer_stores_it():
    card = load_card("btcv")
    by_name = {lab.name: lab for lab in card.labels}
    assert by_name["spleen"].type.as_list() == ["SCT", "78961009", "Spleen"]
    assert by_name["liver"].type.value == "10200004"
    assert by_name["right kidney"].type.value == "64033007"
    assert by_name["right kidney"].type_modifier.value == "24028007"
    assert by_name["left adrenal gland"].type_modifier.meaning == "Left"
    for lab in card.labels:
        t = lab.terminology()
        assert t["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert t["type"][0] == "SCT" and t["type"][1].isdigit()
        assert len(set(lab.color)) > 0 and all(0 <= c <= 255 for c in lab.color)


def test_card_round_trips_through_json():
    card = load_card("btcv")
    again = card_from_dict(json.loads(json.dumps(card.to_json())))
    assert again.to_json() == card.to_json()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("labels"), "'labels' is missing"),
    (lambda d: d["network"].update(name="UNet"), "not supported"),
    (lambda d: d["preprocessing"].update(spacing=[1.5, -1, 2]), "positive"),
    (lambda d: d["preprocessing"].update(orientation="RRS"), "axis codes"),
    (lambda d: d["inference"].update(roi_size=[96, 96, 90]), "multiples of 32"),
    (lambda d: d["inference"].update(overlap=1.5), "overlap"),
    (lambda d: d["labels"][0].update(value=14), "between 1 and"),
    (lambda d: d["labels"][1].update(value=1), "appears twice"),
    (lambda d: d["labels"][0].update(color=[300, 0, 0]), "color"),
    (lambda d: d["labels"][0].update(type=["SCT", "1"]), "scheme, code value, meaning"),
])
def test_bad_cards_are_named(mutate, message):
    data = load_card("btcv").to_json()
    mutate(data)
    with pytest.raises(UserError, match=message):
        card_from_dict(data, source="my.json")


def test_unknown_card_lists_known(tmp_path):
    with pytest.raises(UserError, match="known cards: .*btcv"):
        load_card("nonexistent")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_card(tmp_path / "bad.json")
