"""Self-supervised pretraining of SwinUNETR's Swin encoder (Tang et al., CVPR 2022).

- :mod:`.data`: the unlabeled scans and the sub-volumes drawn from them.
- :mod:`.views`: two views of each sub-volume: axial rotations and cut-outs.
- :mod:`.heads`: the encoder with its rotation, contrastive and reconstruction heads.
- :mod:`.losses`: the three proxy losses and their weighted sum.
- :mod:`.encoder`: loading pretrained encoder weights into a network for fine-tuning.
- :mod:`.pretrain`: the loop (``swinunetr-segment pretrain``).

The submodules are imported on use (``from SwinUNETRSegmentLib.training.ssl.encoder import load_encoder_weights``).
"""

__all__ = ["data", "views", "heads", "losses", "encoder", "pretrain"]
