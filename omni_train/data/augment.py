"""Training-time augmentation: `data.audio.augment`, `data.image.augment`, `data.video.augment`.

Each list holds ops of `degrade.OPS` (the probes' degradations), each with a probability `p` and, for each of the
op's fields, one value or a `[low, high]` range drawn uniformly per application (integer fields: uniformly among
the integers; speed factors: on a grid of 0.005 inside the range, so that each factor's resampling filter is
designed once); a field left out takes its default. Ops are applied in list order, each independently with its p; an op with
`from_epoch: E` starts at epoch E of its sample's source (0-based; a curriculum: clean first, messy later):

    data:
      audio:
        augment: [{op: white_noise, p: 0.5, snr_db: [10, 30], from_epoch: 12}, {op: speed, p: 0.2, factor: [0.9, 1.1]}]
      video:
        augment: [{op: frame_drop, p: 0.3, rate: [0.1, 0.3]}, {op: jpeg, p: 0.5, quality: [30, 90]}]

`data.audio.augment` changes every waveform the encoder sees, a video's audio track included; `data.image.augment`
an image's pixels, `data.video.augment` a video's frames, all as decoded (before resizing and features).
babble and overlap are refused here: the other utterances they add would come from whatever the worker decoded
before, so an augmented sample would depend on decode order, worker count and resume point.

Determinism. `Augmenter` is the MediaTransform the pipeline passes to `decode_sample` for a training sample. Its
draws come from numpy Generators seeded with [run seed, epoch, crc32 of "<shard file name>:<key>", modality,
part, op index], so a sample's augmentation depends on nothing else: not the worker count, the decode order or
a resume. A part no op fires on is returned as the very object it was given, which tells the decode cache that
the part's clean features can be reused (pipeline.py).
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from omni_train.data import degrade

MODALITIES = ("audio", "image", "video")
NEEDS_OTHERS = ("babble", "overlap")
# degrade.OPS fields whose values are integers ("an integer in ..."): their ranges are drawn among the integers
INTEGER_FIELDS = ("talkers", "quality", "sample_rate_hz", "bands")
SPEED_STEP = 0.005  # the grid of the speed factors drawn (49 over 0.88-1.12)
_STREAMS = {modality: i for i, modality in enumerate(MODALITIES)}


@dataclass(frozen=True)
class AugmentOp:
    op: str
    p: float
    ranges: tuple[tuple[str, float, float], ...]   # every field of the op in degrade.OPS order: (name, low, high)
    from_epoch: int = 0                             # the op fires from this epoch of the sample's source on

    def draw(self, rng: np.random.Generator) -> degrade.Condition:
        """The condition of one application: each field uniform in its range (every field drawn, fixed or not)."""
        values = {}
        for name, low, high in self.ranges:
            u = rng.random()
            if name in INTEGER_FIELDS:
                values[name] = float(min(int(high), int(low) + math.floor(u * (int(high) - int(low) + 1))))
            elif self.op == "speed":  # on a grid: each factor's resampling filter is designed once (degrade._lowpass)
                values[name] = min(high, max(low, round((low + u * (high - low)) / SPEED_STEP) * SPEED_STEP))
            else:
                values[name] = low + u * (high - low)
        severity = degrade.OPS[self.op].severity
        return degrade.Condition(self.op, values[severity],
                                 tuple((name, values[name]) for name, _, _ in self.ranges if name != severity))


def parse_augment(spec: Any, where: str, modality: str) -> list[AugmentOp]:
    """An `augment:` list -> AugmentOps, or ValueError naming the field (`audio.augment[1].p must be ...`)."""
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{where} must be a list of ops like {{op: white_noise, p: 0.5, snr_db: [10, 30]}}, got {spec!r}")
    ops = []
    for i, entry in enumerate(spec):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or "op" not in entry:
            raise ValueError(f"{at} must be a mapping with an op and a p, e.g. {{op: white_noise, p: 0.5, snr_db: [10, 30]}}, "
                             f"got {entry!r}")
        name = entry["op"]
        allowed = [op for op, spec_op in degrade.OPS.items() if modality in spec_op.modalities and op not in NEEDS_OTHERS]
        if name in NEEDS_OTHERS and modality == "audio":
            raise ValueError(f"{at}.op {name} is not a training augmentation: the other utterances it adds would depend "
                             f"on decode order; use one of {', '.join(allowed)}")
        if name not in allowed:
            raise ValueError(f"{at}.op must be one of {', '.join(allowed)} for {modality}, got {name!r}")
        op = degrade.OPS[name]
        unknown = [k for k in entry if k not in ("op", "p", "from_epoch") and k not in op.fields]
        if unknown:
            raise ValueError(f"{at}.{unknown[0]} is not a field of op {name} (fields: p, from_epoch, {', '.join(op.fields)})")
        from_epoch = entry.get("from_epoch", 0)
        if isinstance(from_epoch, bool) or not isinstance(from_epoch, int) or from_epoch < 0:
            raise ValueError(f"{at}.from_epoch must be an epoch number >= 0, got {from_epoch!r}")
        p = entry.get("p")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{at}.p must be a probability in [0, 1], got {p!r}")
        ranges = []
        for field_name, field in op.fields.items():
            value = entry.get(field_name, field.default)
            if value is None:
                raise ValueError(f"{at}.{field_name} is required by op {name}: {field.rule}, or a [low, high] range of them")
            bounds = value if isinstance(value, (list, tuple)) else [value, value]
            if len(bounds) != 2:
                raise ValueError(f"{at}.{field_name} must be {field.rule} or a [low, high] range, got {value!r}")
            for v in bounds:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not field.ok(v):
                    raise ValueError(f"{at}.{field_name} must be {field.rule} or a [low, high] range of them, got {value!r}")
            if bounds[0] > bounds[1]:
                raise ValueError(f"{at}.{field_name} range must be [low, high] with low <= high, got {value!r}")
            ranges.append((field_name, float(bounds[0]), float(bounds[1])))
        if name == "telephone":
            values = {n: (lo, hi) for n, lo, hi in ranges}
            if not (values["low_hz"][1] < values["high_hz"][0] and values["high_hz"][1] < values["sample_rate_hz"][0] / 2):
                raise ValueError(f"{at}.high_hz must lie above low_hz and below half of sample_rate_hz over their "
                                 f"whole ranges")
        ops.append(AugmentOp(name, float(p), tuple(ranges), from_epoch))
    return ops


def sample_seed(seed: int, epoch: int, shard: str, key: str) -> list[int]:
    """The seed material of one sample's augmentation: the run's seed, the epoch, its shard file name and key."""
    return [int(seed), int(epoch), zlib.crc32(f"{os.path.basename(shard)}:{key}".encode())]


class Augmenter:
    """The MediaTransform of one training sample read in `epoch`: each modality's ops, drawn from `seed`
    (`sample_seed`)."""

    def __init__(self, ops: dict[str, Sequence[AugmentOp]], seed: Sequence[int], epoch: int = 0):
        self.ops, self.seed, self.epoch = ops, [int(s) for s in seed], int(epoch)

    @classmethod
    def from_config(cls, data_cfg, seed: Sequence[int], epoch: int = 0) -> Augmenter | None:
        """The augmenter of `data_cfg` (DataConfig) for one sample, or None when it configures no augmentation."""
        ops = {m: getattr(data_cfg, m).augment_ops for m in MODALITIES}
        return cls(ops, seed, epoch) if any(ops.values()) else None

    def _conditions(self, modality: str, part: int) -> list[tuple[int, degrade.Condition]]:
        """(op index, condition) of the ops that fire on this part, in list order."""
        fired = []
        for i, op in enumerate(self.ops[modality]):
            rng = np.random.default_rng([*self.seed, _STREAMS[modality], part, i])
            fires = rng.random() < op.p and self.epoch >= op.from_epoch  # the same draws before from_epoch
            condition = op.draw(rng)
            if fires:
                fired.append((i, condition))
        return fired

    def _degradation(self, modality: str, i: int, condition: degrade.Condition) -> degrade.Degradation:
        return degrade.Degradation(condition, [*self.seed, _STREAMS[modality], i])

    def audio(self, waveform: torch.Tensor, sample_rate_hz: int, part: int) -> torch.Tensor:
        for i, condition in self._conditions("audio", part):
            waveform = self._degradation("audio", i, condition).audio(waveform, sample_rate_hz, part)
        return waveform

    def frames(self, frames: torch.Tensor, timestamps_s: torch.Tensor, part: int,
               modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        for i, condition in self._conditions(modality, part):
            frames, timestamps_s = self._degradation(modality, i, condition).frames(frames, timestamps_s, part, modality)
        return frames, timestamps_s
