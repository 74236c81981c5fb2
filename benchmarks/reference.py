"""The reference: the MONAI model-zoo swin_unetr_btcv_segmentation inference pipeline.

Exactly what ``configs/inference.json`` of the bundle builds (model-zoo, models/
swin_unetr_btcv_segmentation), written out in Python because the bundle's evaluator needs
pytorch-ignite and evaluates ``$`` expressions:

preprocessing  LoadImaged(ITKReader; NibabelReader where itk is not installed), EnsureChannelFirstd, Orientationd(RAS),
               Spacingd(1.5, 1.5, 2.0, bilinear), ScaleIntensityRanged(-175..250 -> 0..1,
               clip), EnsureTyped
inferer        SlidingWindowInferer(roi 96^3, sw_batch_size 4, overlap 0.5)
postprocessing Activationsd(softmax), Invertd(pred, transform=preprocessing,
               orig_keys=image, nearest_interp=False), AsDiscreted(argmax)

The intensity window, spacing, window size, batch and overlap come from the card (the
built-in btcv card holds the bundle's values). Differences from running the bundle: no
DataLoader worker processes (one image; workers would only add processes and memory),
no SaveImaged (the labels stay in memory; the engine's are not written either). On CUDA
the evaluator's ``amp: true`` is honoured with float16 autocast; on the CPU ``amp`` has no
effect in the bundle (it asks for CUDA autocast), so the reference runs in float32.
"""

from __future__ import annotations

import time

import numpy as np


def image_reader() -> str:
    """The bundle's ITKReader when the ``itk`` package is installed (``pip install itk``),
    else MONAI's NibabelReader: for a NIfTI file both give the same array and affine."""
    try:
        import itk  # noqa: F401

        return "ITKReader"
    except ImportError:
        return "NibabelReader"


def build_transforms(card):
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    it = card.intensity
    pre = Compose(
        [
            LoadImaged(keys="image", reader=image_reader()),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes=card.orientation),
            Spacingd(keys="image", pixdim=list(card.spacing), mode=card.interpolation),
            ScaleIntensityRanged(
                keys="image",
                a_min=it["a_min"],
                a_max=it["a_max"],
                b_min=it["b_min"],
                b_max=it["b_max"],
                clip=bool(it.get("clip", True)),
            ),
            EnsureTyped(keys="image"),
        ]
    )
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    return pre, post


def run_reference(path: str, card, checkpoint: str, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, dict]:
    """(labels ``[i, j, k]`` uint8, their IJK-to-RAS, seconds per stage) for one file."""
    import torch
    from monai.data import decollate_batch, list_data_collate
    from monai.inferers import SlidingWindowInferer

    from SwinUNETRSegmentLib.models.checkpoint import read_state_dict
    from SwinUNETRSegmentLib.models.networks import build_network

    dev = torch.device(device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    net = build_network(card).to(dev)
    net.load_state_dict(read_state_dict(checkpoint))  # the bundle's CheckpointLoader: strict load
    net.eval()
    timings["load"] = time.perf_counter() - t0

    pre, post = build_transforms(card)
    t = time.perf_counter()
    data = {"image": path}
    data = pre.transforms[0](data)  # LoadImaged
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    for tr in pre.transforms[1:]:
        data = tr(data)
    batch = list_data_collate([data])  # what the bundle's DataLoader(batch_size=1) hands the evaluator
    timings["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    inferer = SlidingWindowInferer(
        roi_size=list(card.roi_size), sw_batch_size=card.sw_batch_size, overlap=card.overlap, mode=card.blend_mode
    )
    amp = torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else _null()
    with torch.no_grad(), amp:  # SupervisedEvaluator: eval mode, no_grad, amp on CUDA
        batch["pred"] = inferer(batch["image"].to(dev), net)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    timings["inference"] = time.perf_counter() - t

    t = time.perf_counter()
    items = [post(item) for item in decollate_batch(batch)]
    pred = items[0]["pred"]
    labels = np.asarray(pred[0].detach().cpu().numpy()).astype(np.uint8)
    affine = np.asarray(pred.affine.cpu().numpy(), dtype=np.float64)
    timings["postprocess"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return labels, affine, timings


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
