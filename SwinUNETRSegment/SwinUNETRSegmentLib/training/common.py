"""What supervised training and pretraining share: processes, seeds, learning rates, data
lists and the resumable record of a run.

- :class:`Distributed`: PyTorch's distributed training when ``torchrun`` starts the command.
- :func:`seed_epoch`: one seed per (run seed, epoch, rank) for every random stream of an
  epoch, so that a resumed run repeats what an uninterrupted one would have drawn, and each
  process of a ``torchrun`` draws its own augmentations.
- :func:`epoch_learning_rate`, :func:`step_lr_factor`: the learning rate from the epoch (or
  step) number alone, so a resumed run continues the same curve.
- :func:`load_datalist`: a MONAI Decathlon datalist with checked, absolute paths.
- :func:`load_last`, :func:`check_settings`, :func:`save_epoch`: ``last.pt`` (the resumable
  state, with the settings that made it) and ``log.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.fileio.atomic import atomic_torch_save

__all__ = ["Distributed", "quiet", "epoch_seed", "seed_epoch", "epoch_learning_rate", "step_lr_factor",
           "load_datalist", "content_digest", "command_line", "load_last", "check_settings", "save_epoch",
           "RESUMABLE_SETTINGS"]

#: Options that may differ when a run is resumed: how long it runs, how often it validates,
#: where it runs and how it logs; none of them changes what an epoch draws or learns.
RESUMABLE_SETTINGS = ("epochs", "max_minutes", "val_every", "device", "name", "fp16_weights", "no_amp")


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------
def quiet(*_args, **_kwargs) -> None:
    """A ``log`` that says nothing (every rank but 0)."""
    return None


class Distributed:
    """PyTorch's own distributed training when launched by ``torchrun`` (WORLD_SIZE > 1).

    nccl on CUDA (one GPU per process, LOCAL_RANK), gloo on the CPU. Rank 0 alone writes
    checkpoints, logs and cards; every rank trains on its own shard of the data. Without
    ``torchrun`` every method is the single-process identity.
    """

    def __init__(self, device_name: str = "auto"):
        import torch
        import torch.distributed as dist

        from SwinUNETRSegmentLib.inference.devices import resolve_device

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        device = resolve_device(device_name)
        if self.enabled and device.type == "cuda":
            device = torch.device(f"cuda:{self.local_rank}")
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, net):
        """``net`` in DistributedDataParallel (gradients averaged over the ranks), or ``net``."""
        if not self.enabled:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def shard(self, n: int) -> list[int]:
        """This rank's item indices, as torch's DistributedSampler deals them (no shuffle)."""
        if not self.enabled:
            return list(range(n))
        from torch.utils.data.distributed import DistributedSampler

        return list(DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=False))

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank (an all-reduce of the minimum),
        so that all ranks take the same branch around a collective such as DDP's backward."""
        if not self.enabled:
            return bool(flag)
        import torch
        import torch.distributed as dist

        where = self.device if self.device.type == "cuda" else "cpu"  # nccl needs CUDA tensors, gloo CPU ones
        box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=where)
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        return bool(box.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# seeds and learning rates
# --------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch of one rank: a 32-bit number from (``seed``, ``epoch``, ``rank``)
    by NumPy's SeedSequence, so that no two (epoch, rank) pairs of a run share a stream."""
    import numpy as np

    if seed < 0 or epoch < 0 or rank < 0:
        raise UserError(f"--seed {seed}: a seed is a non-negative integer")
    return int(np.random.SeedSequence((int(seed), int(epoch), int(rank))).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int = 0, randomizables: Sequence[Any] = ()) -> int:
    """Seed every random stream of an epoch from :func:`epoch_seed`: Python's, NumPy's and
    torch's global generators (MONAI's ``set_determinism``) and each MONAI ``Randomizable``
    (a ``Compose`` of random transforms seeds its members) by ``set_random_state``.

    Returns:
        the epoch's seed, for the caller's own generators.
    """
    from monai.utils import set_determinism

    value = epoch_seed(seed, epoch, rank)
    set_determinism(seed=value)
    for r in randomizables:
        r.set_random_state(seed=value)
    return value


def epoch_learning_rate(lr: float, epoch: int, epochs: int, schedule: str = "constant") -> float:
    """Learning rate of ``epoch`` (1-based): ``lr`` (``"constant"``), or cosine decay from
    ``lr`` at epoch 1 towards 0 at ``epochs`` (``"cosine"``)."""
    if schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * (epoch - 1) / max(1, epochs)))
    return lr


def step_lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Factor of the learning rate at ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` steps, then 1 (``"constant"``) or cosine decay to 0 at ``total`` (``"cosine"``)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def load_datalist(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) of a MONAI Decathlon datalist: each
    ``{"image": ..., "label": ...}`` with absolute paths (relative ones are relative to the
    JSON file), every path checked to exist."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"datalist not found: {path}; give a MONAI Decathlon JSON file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"datalist {p} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list) or not data["training"]:
        raise UserError(f"datalist {p} needs a non-empty 'training' list of {{\"image\": ..., \"label\": ...}}")

    def items(key: str) -> list[dict]:
        out = []
        for n, item in enumerate(data.get(key) or []):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise UserError(f"datalist {p}: {key}[{n}] needs 'image' and 'label'")
            resolved = {}
            for k in ("image", "label"):
                q = Path(item[k])
                q = q if q.is_absolute() else p.parent / q
                if not q.exists():
                    raise UserError(f"datalist {p}: {key}[{n}] {k} not found: {q}")
                resolved[k] = str(q)
            out.append(resolved)
        return out

    return items("training"), items("validation")


# --------------------------------------------------------------------------------------
# the record of a run
# --------------------------------------------------------------------------------------
def content_digest(obj: Any) -> str:
    """SHA256 of a JSON-able object (keys sorted): a model card's content, whatever its file."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def command_line(prog: str, argv: Optional[Sequence[str]]) -> str:
    """``prog`` and ``argv`` as a shell would take them back."""
    return " ".join([prog, *(shlex.quote(str(a)) for a in argv or [])])


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a setting as it reads back from JSON or ``torch.load``."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def load_last(path: Path) -> Optional[dict]:
    """The checkpoint ``last.pt`` at ``path`` (plain tensors and numbers, ``weights_only``), or None."""
    if not path.exists():
        return None
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"cannot resume from {path} ({' '.join(str(exc).split())[:160]}); "
                        "it is truncated or not a checkpoint of this command: give another --out") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this command; give another --out")
    return ckpt


def _shown(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def check_settings(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], path: Path,
                   content_keys: Sequence[str] = (), log: Callable[[str], Any] = quiet) -> None:
    """Refuse to resume the run recorded at ``path`` with other settings than its own.

    Args:
        saved: the settings ``last.pt`` recorded (None: a checkpoint of an older version,
            which recorded none: nothing to compare, said in ``log``).
        current: this invocation's settings, keyed by option name (``"lr"`` for ``--lr``).
        content_keys: settings compared by content (a card, a data list), named without
            their values.

    Raises:
        UserError: one line naming the first setting that differs and what to do.
    """
    if saved is None:
        log(f"{path} records no settings (an older version wrote it): resuming without comparing them")
        return
    saved, current = _plain(dict(saved)), _plain(dict(current))
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_SETTINGS or saved.get(key) == current.get(key):
            continue
        option = "--" + key.replace("_", "-")
        if key in content_keys:
            what = f"another {option} (its content differs)"
        else:
            what = f"{option} {_shown(saved.get(key))}, not {_shown(current.get(key))}"
        raise UserError(f"{path} was made with {what}; a rerun resumes a run only with its own settings "
                        f"(--epochs, --max-minutes and --val-every may change): repeat them, or give another --out "
                        "to start a new run")


def save_epoch(out: Path, checkpoint: Mapping[str, Any], entry: Mapping[str, Any]) -> None:
    """Write ``last.pt`` (atomically) and append ``entry`` to ``log.jsonl``."""
    atomic_torch_save(dict(checkpoint), out / "last.pt")
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
