"""Making models: supervised training and fine-tuning, and self-supervised pretraining.

- :mod:`.common`: what both share: processes (``torchrun``), per-epoch seeds, learning-rate
  schedules, data lists, and the resumable record of a run (``last.pt``, ``log.jsonl``).
- :mod:`.labels`: label maps and Slicer ``.seg.nrrd`` files as the card's label values.
- :mod:`.metrics`: validation Dice per label (what chooses ``best.pt``).
- :mod:`.supervised`: the training transforms and loop (``swinunetr-segment train``), and
  making a run's result a built-in model.
- :mod:`.ssl`: self-supervised pretraining of the Swin encoder (``swinunetr-segment pretrain``).

The command lines are :mod:`SwinUNETRSegmentLib.cli.train` and :mod:`SwinUNETRSegmentLib.cli.pretrain`.
The submodules are imported on use (``from SwinUNETRSegmentLib.training.supervised import train``).
"""

__all__ = ["common", "labels", "metrics", "supervised", "ssl"]
