"""Per-modality data augmentation, applied to training batches only, seeded.

The run config names what to augment per modality kind, e.g.
``augment = "image:shift+rotate, audio:specaugment+gain, sensor:jitter"``;
:func:`parse_augment` turns that into a plan and :class:`Augmenter` applies the
plan to a batch of model inputs (the modality tensors in schema order followed
by the presence mask). Labels are never seen. Every modality of a planned kind
is augmented (``image:front`` and ``image:side`` both get the ``image`` ops);
absent rows are zero again afterwards, so the presence mask still tells the
truth. Evaluation never augments.

Available ops and their strengths (module constants):

image (ops ``shift``, ``crop`` and ``rotate`` need raw ``pixels``; ``noise`` works on any image features)
    The geometric ops are combined into one random affine map per sample and
    resampled bilinearly (``F.affine_grid`` / ``F.grid_sample``, border padding):
    ``shift`` translates by up to :data:`IMAGE_SHIFT_PX` pixels on each axis,
    ``rotate`` turns by up to :data:`IMAGE_ROTATE_DEG` degrees either way, and
    ``crop`` takes a random crop that is then resized back, i.e. a zoom-in by a
    factor uniform in ``[1, IMAGE_CROP_MAX_ZOOM]`` about a random centre that
    keeps the crop inside the image. ``noise`` adds Gaussian noise of standard
    deviation :data:`IMAGE_NOISE_SIGMA`.
audio (``log-mel`` or ``mfcc`` maps ``[B, 1, F, T]``)
    ``gain`` adds one per-sample offset uniform in ``[-AUDIO_GAIN, AUDIO_GAIN]``
    to the (log-domain) map, which is a gain change of the signal; ``shift``
    rolls the map circularly along time by up to :data:`AUDIO_SHIFT_FRACTION`
    of its frames; ``noise`` adds Gaussian noise of standard deviation
    :data:`AUDIO_NOISE_SIGMA`; ``specaugment`` sets one band of up to
    ``max(1, F * SPECAUGMENT_FRACTION)`` frequency bins and one span of up to
    ``max(1, T * SPECAUGMENT_FRACTION)`` frames to zero per sample (Park et
    al., "SpecAugment", Interspeech 2019).
text (``tokens``, int64 ``[B, L]``, 0 is padding)
    ``dropout`` replaces each non-padding token by 0 with probability
    :data:`TEXT_DROPOUT_P`; ``swap`` swaps each adjacent pair of non-padding
    tokens with probability :data:`TEXT_SWAP_P` (a pair overlapping the pair
    chosen just before it is skipped, so no token moves twice).
sensor (``series``, ``[B, C, T]``)
    ``jitter`` adds Gaussian noise of standard deviation
    :data:`SENSOR_JITTER_SIGMA`; ``scale`` multiplies each channel of each
    sample by a factor drawn from ``N(1, SENSOR_SCALE_SIGMA**2)``.
tabular (``values``, ``[B, D]``)
    ``noise`` adds Gaussian noise of standard deviation :data:`TABULAR_NOISE_SIGMA`.

Ops of one kind are applied in the order of :data:`OPS` (so SpecAugment's
masks come last and stay zero), whatever order the config lists them in.
All randomness comes from the augmenter's own CPU ``torch.Generator`` (the
global RNG is never touched): two augmenters with the same seed give the same
outputs for the same inputs, on any device.

>>> from fedmm.data.schema import Modality, Schema
>>> schema = Schema((Modality("image", ModalityKind.IMAGE, (1, 8, 8), "pixels"),), ("a", "b"))
>>> augment = Augmenter(schema, parse_augment("image:shift+noise"), seed=0)
>>> images, present = torch.ones(4, 1, 8, 8), torch.tensor([[1.0], [1.0], [0.0], [1.0]])
>>> out = augment([images, present])
>>> out[0].shape, bool(out[0][2].eq(0).all()), out[1] is present
(torch.Size([4, 1, 8, 8]), True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from fedmm.data.schema import Modality, ModalityKind, Schema
from fedmm.errors import ConfigError

from fedmm.data.augment_spec import OPS, _check_ops, _hint, format_augment, parse_augment

__all__ = [
    "OPS",
    "parse_augment",
    "format_augment",
    "Augmenter",
    "IMAGE_SHIFT_PX",
    "IMAGE_ROTATE_DEG",
    "IMAGE_CROP_MAX_ZOOM",
    "IMAGE_NOISE_SIGMA",
    "AUDIO_GAIN",
    "AUDIO_SHIFT_FRACTION",
    "AUDIO_NOISE_SIGMA",
    "SPECAUGMENT_FRACTION",
    "TEXT_DROPOUT_P",
    "TEXT_SWAP_P",
    "SENSOR_JITTER_SIGMA",
    "SENSOR_SCALE_SIGMA",
    "TABULAR_NOISE_SIGMA",
]

IMAGE_SHIFT_PX = 2.0  # largest translation per axis, pixels
IMAGE_ROTATE_DEG = 15.0  # largest rotation either way, degrees
IMAGE_CROP_MAX_ZOOM = 1.25  # a random crop of 1/1.25 .. 1 of each side, resized back
IMAGE_NOISE_SIGMA = 0.1
AUDIO_GAIN = 0.3  # largest log-domain offset either way
AUDIO_SHIFT_FRACTION = 0.1  # largest circular time shift, as a fraction of the frames
AUDIO_NOISE_SIGMA = 0.1
SPECAUGMENT_FRACTION = 1 / 8  # largest frequency / time mask, as a fraction of bins / frames
TEXT_DROPOUT_P = 0.1
TEXT_SWAP_P = 0.1
SENSOR_JITTER_SIGMA = 0.05
SENSOR_SCALE_SIGMA = 0.1
TABULAR_NOISE_SIGMA = 0.05

_GEOMETRIC = ("shift", "crop", "rotate")

# The representations each (kind, op) works on; an op missing here works on any.
_NEEDS: dict[tuple[ModalityKind, str], tuple[str, ...]] = {
    **{(ModalityKind.IMAGE, op): ("pixels",) for op in _GEOMETRIC},
    **{(ModalityKind.AUDIO, op): ("log-mel", "mfcc") for op in OPS[ModalityKind.AUDIO]},
    **{(ModalityKind.TEXT, op): ("tokens",) for op in OPS[ModalityKind.TEXT]},
    **{(ModalityKind.SENSOR, op): ("series",) for op in OPS[ModalityKind.SENSOR]},
    (ModalityKind.TABULAR, "noise"): ("values",),
}

def _uniform(generator: torch.Generator, shape: Sequence[int], low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    """Uniform ``[low, high)`` numbers drawn on the CPU, moved to ``like``'s device and dtype."""
    draw = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    return (low + (high - low) * draw).to(device=like.device, dtype=like.dtype)


def _normal(generator: torch.Generator, shape: Sequence[int], mean: float, std: float, like: torch.Tensor) -> torch.Tensor:
    """Gaussian numbers drawn on the CPU, moved to ``like``'s device and dtype."""
    draw = torch.randn(tuple(shape), generator=generator, dtype=like.dtype)
    return (mean + std * draw).to(like.device)


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """View ``[B]`` values as ``[B, 1, ..., 1]`` with ``ndim`` dimensions in all."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


class Augmenter:
    """Applies a plan ``{kind: ops}`` to training batches, with its own seeded generator.

    Parameters
    ----------
    schema
        The federation's modalities; every modality of a planned kind is augmented.
    plan
        ``{kind: ops}``, as :func:`parse_augment` returns; an empty plan leaves
        batches as they are.
    seed
        Seeds the augmenter's ``torch.Generator``; the global RNG is never used.

    Raises
    ------
    ConfigError
        (key ``augment``) for an unknown kind or op, a kind no modality of the
        schema has, or an op that does not fit a modality's representation
        (image geometry on scattering coefficients, say).
    """

    def __init__(self, schema: Schema, plan: Mapping[ModalityKind, Sequence[str]], seed: int) -> None:
        self.schema = schema
        self.seed = seed
        spec = format_augment(plan)
        clean: dict[ModalityKind, tuple[str, ...]] = {}
        kinds = [str(k) for k in OPS]
        for raw_kind, raw_ops in plan.items():
            if str(raw_kind) not in kinds:
                raise ConfigError(
                    "augment", f"unknown modality kind '{raw_kind}'", value=spec,
                    fix=f"{_hint(str(raw_kind), kinds)}kinds are: {', '.join(kinds)}",
                )
            kind = ModalityKind(str(raw_kind))
            ops = tuple(raw_ops)
            _check_ops(kind, ops, spec)
            clean[kind] = tuple(op for op in OPS[kind] if op in ops)  # canonical order
        self.plan: dict[ModalityKind, tuple[str, ...]] = clean

        existing = ", ".join(f"{m.name} ({m.kind}, {m.representation})" for m in schema.modalities) or "none"
        for kind, ops in clean.items():
            if not any(m.kind == kind for m in schema.modalities):
                raise ConfigError(
                    "augment", f"the plan augments {kind} modalities but the dataset has none", value=spec,
                    fix=f"drop the '{kind}:' entry; the dataset's modalities are: {existing}",
                )
        # (modality index, ops) of every modality that is augmented
        self._jobs: list[tuple[int, tuple[str, ...]]] = []
        for index, modality in enumerate(schema.modalities):
            ops = clean.get(modality.kind, ())
            if ops:
                self._check_modality(modality, ops, spec)
                self._jobs.append((index, ops))
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    @staticmethod
    def _check_modality(modality: Modality, ops: tuple[str, ...], spec: str) -> None:
        for op in ops:
            needs = _NEEDS.get((modality.kind, op))
            if needs is not None and modality.representation not in needs:
                if modality.kind == ModalityKind.IMAGE:
                    fix = "use a model on raw pixels, e.g. model=concat, or only image:noise"
                else:
                    fix = f"{modality.kind} augmentation needs {' or '.join(needs)} features; drop the '{modality.kind}:' entry"
                raise ConfigError(
                    "augment",
                    f"{modality.kind}:{op} cannot augment modality '{modality.name}', whose features are "
                    f"'{modality.representation}' (it needs {' or '.join(needs)})",
                    value=spec, fix=fix,
                )
        geometric = modality.kind == ModalityKind.IMAGE and any(op in _GEOMETRIC for op in ops)
        if (geometric or modality.kind == ModalityKind.AUDIO) and len(modality.shape) < 2:
            raise ConfigError(
                "augment", f"modality '{modality.name}' has shape {modality.shape}, not [..., H, W] or [..., F, T]",
                value=spec, fix=f"drop the '{modality.kind}:' entry",
            )
        if modality.kind == ModalityKind.TEXT and len(modality.shape) != 1:
            raise ConfigError(
                "augment", f"text modality '{modality.name}' has shape {modality.shape}, not [L]",
                value=spec, fix="drop the 'text:' entry",
            )

    def __repr__(self) -> str:
        return f"Augmenter({format_augment(self.plan)!r}, seed={self.seed})"

    def __bool__(self) -> bool:
        """False when the plan changes nothing."""
        return bool(self._jobs)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Augment one batch: the modality tensors in schema order, then the presence mask.

        Returns a new list of the same length: augmented modalities are new
        tensors of the same shape, dtype and device, with absent rows zero;
        other modalities and the mask are the very tensors given. Inputs are
        never modified in place. An empty batch is returned as it is.
        """
        count = len(self.schema.modalities)
        if len(inputs) != count + 1:
            raise ValueError(f"expected {count} modality tensors and a presence mask, got {len(inputs)} tensors")
        out = list(inputs)
        mask = inputs[-1]
        batch = int(mask.shape[0])
        if mask.shape != (batch, count):
            raise ValueError(f"presence mask has shape {tuple(mask.shape)}, expected {(batch, count)}")
        if batch == 0 or not self._jobs:
            return out
        with torch.no_grad():
            for index, ops in self._jobs:
                modality = self.schema.modalities[index]
                x = inputs[index]
                if x.shape[0] != batch:
                    raise ValueError(f"modality '{modality.name}' has {x.shape[0]} rows, the mask {batch}")
                y = self._augment(modality.kind, ops, x)
                present = _per_sample(mask[:, index] > 0, y.dim()).to(y.device)
                out[index] = torch.where(present, y, torch.zeros((), dtype=y.dtype, device=y.device))
        return out

    # -- per kind ------------------------------------------------------------------------------------

    def _augment(self, kind: ModalityKind, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        if kind == ModalityKind.IMAGE:
            return self._image(ops, x)
        if kind == ModalityKind.AUDIO:
            return self._audio(ops, x)
        if kind == ModalityKind.TEXT:
            return self._text(ops, x)
        if kind == ModalityKind.SENSOR:
            return self._sensor(ops, x)
        return self._noise(x, TABULAR_NOISE_SIGMA)  # tabular: noise is its only op

    def _noise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x + _normal(self._generator, x.shape, 0.0, sigma, x)

    def _image(self, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        if any(op in _GEOMETRIC for op in ops):
            x = self._affine(ops, x)
        if "noise" in ops:
            x = self._noise(x, IMAGE_NOISE_SIGMA)
        return x

    def _affine(self, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """One random affine map per sample (rotation, zoom-in crop, translation), bilinear, border padding."""
        g, batch = self._generator, x.shape[0]
        height, width = int(x.shape[-2]), int(x.shape[-1])
        zeros = torch.zeros(batch, dtype=x.dtype, device=x.device)
        angle = _uniform(g, (batch,), -1.0, 1.0, x) * math.radians(IMAGE_ROTATE_DEG) if "rotate" in ops else zeros
        if "crop" in ops:
            zoom = _uniform(g, (batch,), 1.0, IMAGE_CROP_MAX_ZOOM, x)
            room = 1.0 - 1.0 / zoom  # how far the crop's centre may move, normalised coordinates
            centre_x = _uniform(g, (batch,), -1.0, 1.0, x) * room
            centre_y = _uniform(g, (batch,), -1.0, 1.0, x) * room
        else:
            zoom, centre_x, centre_y = torch.ones_like(zeros), zeros, zeros
        if "shift" in ops:  # pixels -> normalised coordinates (align_corners=False: a pixel is 2/size)
            shift_x = _uniform(g, (batch,), -IMAGE_SHIFT_PX, IMAGE_SHIFT_PX, x) * (2.0 / width)
            shift_y = _uniform(g, (batch,), -IMAGE_SHIFT_PX, IMAGE_SHIFT_PX, x) * (2.0 / height)
        else:
            shift_x, shift_y = zeros, zeros
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # output -> input coordinates; the aspect factors make the rotation rigid in pixel space
        theta = torch.stack(
            [
                torch.stack([cos, -sin * (height / width), centre_x + shift_x], dim=1),
                torch.stack([sin * (width / height), cos, centre_y + shift_y], dim=1),
            ],
            dim=1,
        )
        images = x.reshape(batch, -1, height, width)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return moved.reshape(x.shape)

    def _audio(self, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        g, batch = self._generator, x.shape[0]
        bins, frames = int(x.shape[-2]), int(x.shape[-1])
        for op in ops:
            if op == "gain":
                x = x + _per_sample(_uniform(g, (batch,), -AUDIO_GAIN, AUDIO_GAIN, x), x.dim())
            elif op == "shift":
                most = int(frames * AUDIO_SHIFT_FRACTION)
                if most > 0:
                    steps = torch.randint(-most, most + 1, (batch,), generator=g).to(x.device)
                    source = (torch.arange(frames, device=x.device)[None, :] - steps[:, None]) % frames  # [B, T]
                    index = source.reshape(batch, *([1] * (x.dim() - 2)), frames).expand(x.shape)
                    x = torch.gather(x, -1, index)
            elif op == "noise":
                x = self._noise(x, AUDIO_NOISE_SIGMA)
            elif op == "specaugment":
                freq = self._band(batch, bins, x.device)  # [B, F]
                time = self._band(batch, frames, x.device)  # [B, T]
                masked = freq[:, :, None] | time[:, None, :]  # [B, F, T]
                x = x.masked_fill(masked.reshape(batch, *([1] * (x.dim() - 3)), bins, frames), 0.0)
        return x

    def _band(self, batch: int, size: int, device: torch.device) -> torch.Tensor:
        """Per sample, a random run of up to ``max(1, size * SPECAUGMENT_FRACTION)`` positions: bool ``[B, size]``."""
        g = self._generator
        most = max(1, int(size * SPECAUGMENT_FRACTION))
        width = torch.randint(0, most + 1, (batch,), generator=g)
        start = (torch.rand(batch, generator=g, dtype=torch.float64) * (size - width + 1)).floor().long()
        positions = torch.arange(size)[None, :]
        band = (positions >= start[:, None]) & (positions < (start + width)[:, None])
        return band.to(device)

    def _text(self, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        g, (batch, length) = self._generator, x.shape
        for op in ops:
            if op == "dropout":
                drop = (torch.rand((batch, length), generator=g) < TEXT_DROPOUT_P).to(x.device)
                x = x.masked_fill(drop & (x != 0), 0)
            elif op == "swap" and length > 1:
                real = x != 0
                chosen = (torch.rand((batch, length - 1), generator=g) < TEXT_SWAP_P).to(x.device)
                chosen = chosen & real[:, :-1] & real[:, 1:]
                # skip a pair that overlaps the chosen pair just before it: kept pairs never touch
                kept = chosen & ~F.pad(chosen[:, :-1], (1, 0), value=False)
                forward = F.pad(kept, (0, 1), value=False).long()  # position i takes token i + 1
                backward = F.pad(kept, (1, 0), value=False).long()  # position i + 1 takes token i
                source = torch.arange(length, device=x.device)[None, :] + forward - backward
                x = torch.gather(x, 1, source)
        return x

    def _sensor(self, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            if op == "jitter":
                x = self._noise(x, SENSOR_JITTER_SIGMA)
            elif op == "scale":
                factor = _normal(self._generator, (*x.shape[:-1], 1), 1.0, SENSOR_SCALE_SIGMA, x)  # [B, C, 1]
                x = x * factor
        return x
