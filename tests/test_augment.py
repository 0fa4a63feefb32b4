"""Training-time data augmentation: shapes, seeding, presence, purity and config errors."""

from __future__ import annotations

import pytest
import torch

from fedmm.data.augment import OPS, Augmenter, format_augment, parse_augment
from fedmm.data.schema import Modality, ModalityKind, Schema
from fedmm.errors import ConfigError

BATCH = 8

MODALITIES = {
    ModalityKind.IMAGE: Modality("image", ModalityKind.IMAGE, (1, 28, 28), "pixels"),
    ModalityKind.AUDIO: Modality("audio", ModalityKind.AUDIO, (1, 32, 63), "log-mel"),
    ModalityKind.TEXT: Modality("text", ModalityKind.TEXT, (16,), "tokens"),
    ModalityKind.SENSOR: Modality("gyroscope", ModalityKind.SENSOR, (3, 100), "series"),
    ModalityKind.TABULAR: Modality("vitals", ModalityKind.TABULAR, (5,), "values"),
}
SCATTERING = Modality("image", ModalityKind.IMAGE, (81, 7, 7), "scattering")
ALL_OPS = [(kind, op) for kind, ops in OPS.items() for op in ops]


def _schema(*modalities: Modality) -> Schema:
    return Schema(tuple(modalities), ("a", "b"))


def _batch(schema: Schema, batch: int = BATCH, *, absent: tuple[int, ...] = (), seed: int = 0) -> list[torch.Tensor]:
    """Random modality tensors (zero where absent) and the presence mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, len(schema.modalities))
    for row in absent:
        mask[row] = 0.0
    tensors = []
    for j, m in enumerate(schema.modalities):
        if m.representation == "tokens":
            x = torch.randint(1, 100, (batch, *m.shape), generator=g)
            x[:, -3:] = 0  # trailing padding
        else:
            x = torch.randn((batch, *m.shape), generator=g)
        keep = mask[:, j].reshape(batch, *([1] * len(m.shape))) > 0
        tensors.append(torch.where(keep, x, torch.zeros((), dtype=x.dtype)))
    return [*tensors, mask]


def _one(kind: ModalityKind, op: str, seed: int = 1) -> tuple[Schema, Augmenter]:
    schema = _schema(MODALITIES[kind])
    return schema, Augmenter(schema, {kind: (op,)}, seed=seed)


@pytest.mark.parametrize(("kind", "op"), ALL_OPS)
def test_every_op_keeps_shape_dtype_and_changes_present_rows(kind: ModalityKind, op: str) -> None:
    schema, augment = _one(kind, op)
    inputs = _batch(schema)

    out = augment(inputs)

    assert len(out) == len(inputs) == 2  # modality tensors + mask; labels never go in
    assert out[0].shape == inputs[0].shape and out[0].dtype == inputs[0].dtype
    assert out[-1] is inputs[-1]
    assert not torch.equal(out[0], inputs[0])


@pytest.mark.parametrize(("kind", "op"), ALL_OPS)
def test_absent_rows_stay_zero_and_inputs_are_not_modified(kind: ModalityKind, op: str) -> None:
    schema, augment = _one(kind, op)
    inputs = _batch(schema, absent=(2, 5))
    before = [t.clone() for t in inputs]

    out = augment(inputs)

    assert torch.count_nonzero(out[0][[2, 5]]) == 0
    assert torch.count_nonzero(out[0][[0, 1, 3, 4, 6, 7]]) > 0
    for t, b in zip(inputs, before):
        assert torch.equal(t, b)
    assert torch.equal(out[-1], before[-1])


@pytest.mark.parametrize(("kind", "op"), ALL_OPS)
def test_empty_batch(kind: ModalityKind, op: str) -> None:
    schema, augment = _one(kind, op)
    inputs = _batch(schema, batch=0)

    out = augment(inputs)

    assert len(out) == 2 and out[0].shape == (0, *schema.modalities[0].shape) and out[-1].shape == (0, 1)


def _full() -> tuple[Schema, dict[ModalityKind, tuple[str, ...]]]:
    schema = _schema(*MODALITIES.values(), Modality("image:side", ModalityKind.IMAGE, (1, 28, 28), "pixels"))
    return schema, {kind: ops for kind, ops in OPS.items()}


def test_same_seed_same_output_different_seed_different_output() -> None:
    schema, plan = _full()
    inputs = _batch(schema, absent=(3,))
    state = torch.get_rng_state()

    first = Augmenter(schema, plan, seed=7)(inputs)
    second = Augmenter(schema, plan, seed=7)(inputs)
    other = Augmenter(schema, plan, seed=8)(inputs)

    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, c, x in zip(first[:-1], other[:-1], inputs[:-1]):
        assert not torch.equal(a, c)
        assert not torch.equal(a, x)  # both image modalities, of one kind, are augmented
    assert torch.equal(first[-1], inputs[-1])


def test_only_planned_kinds_change() -> None:
    schema, _ = _full()
    inputs = _batch(schema)

    out = Augmenter(schema, {ModalityKind.SENSOR: ("jitter",)}, seed=0)(inputs)

    names = schema.names
    for name, x, y in zip(names, inputs, out):
        assert (x is y) == (name != "gyroscope")


def test_text_ops_keep_tokens_and_padding() -> None:
    schema, augment = _one(ModalityKind.TEXT, "swap")
    tokens = _batch(schema)[0]

    swapped = augment(_batch(schema))[0]

    assert torch.equal(swapped.sort(dim=1).values, tokens.sort(dim=1).values)  # a permutation per row
    assert torch.count_nonzero(swapped[:, -3:]) == 0

    dropped = Augmenter(schema, {ModalityKind.TEXT: ("dropout",)}, seed=0)(_batch(schema))[0]
    assert torch.all((dropped == tokens) | (dropped == 0))


def test_specaugment_masks_are_zero_bands() -> None:
    schema, augment = _one(ModalityKind.AUDIO, "specaugment")
    spec = _batch(schema)[0]

    out = augment(_batch(schema))[0]

    changed = out != spec
    assert torch.all(out[changed] == 0)
    assert changed.any()


def test_scattering_images_take_noise_but_not_geometry() -> None:
    schema = _schema(SCATTERING)
    out = Augmenter(schema, {ModalityKind.IMAGE: ("noise",)}, seed=0)(_batch(schema))
    assert out[0].shape == (BATCH, 81, 7, 7)

    for op in ("shift", "crop", "rotate"):
        with pytest.raises(ConfigError, match="scattering") as info:
            Augmenter(schema, {ModalityKind.IMAGE: (op, "noise")}, seed=0)
        assert "model=concat" in str(info.value)


def test_plan_kind_absent_from_schema() -> None:
    schema = _schema(MODALITIES[ModalityKind.IMAGE])
    with pytest.raises(ConfigError, match="audio") as info:
        Augmenter(schema, {ModalityKind.AUDIO: ("gain",)}, seed=0)
    assert "image (image, pixels)" in str(info.value)


def test_wrong_representation_for_audio() -> None:
    schema = _schema(Modality("audio", ModalityKind.AUDIO, (1, 8000), "waveform"))
    with pytest.raises(ConfigError, match="log-mel"):
        Augmenter(schema, {ModalityKind.AUDIO: ("noise",)}, seed=0)


def test_parse_example_and_round_trip() -> None:
    spec = "image:shift+rotate, audio:specaugment+gain,  sensor : jitter "

    plan = parse_augment(spec)

    assert plan == {
        ModalityKind.IMAGE: ("shift", "rotate"),
        ModalityKind.AUDIO: ("specaugment", "gain"),
        ModalityKind.SENSOR: ("jitter",),
    }
    assert parse_augment(format_augment(plan)) == plan
    assert parse_augment("") == {} and parse_augment("  ") == {}


def test_parse_rejects_unknown_op_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="shfit") as info:
        parse_augment("image:shfit+rotate")
    message = str(info.value)
    assert "did you mean 'shift'" in message and "crop" in message and info.value.key == "augment"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("imgae:shift", "did you mean 'image'"),
        ("video:shift", "unknown modality kind 'video'"),
        ("image", "malformed entry 'image'"),
        ("image:", "malformed"),
        ("image:shift++rotate", "empty op"),
        ("image:shift, ,audio:gain", "empty entry"),
        ("image:shift:rotate", "malformed"),
        ("image:shift, image:rotate", "two entries"),
        ("image:shift+shift", "twice"),
        ("text:specaugment", "audio"),
    ],
)
def test_parse_rejects_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="augment") as info:
        parse_augment(spec)
    assert needle in str(info.value)


def test_empty_plan_passes_batches_through() -> None:
    schema, _ = _full()
    inputs = _batch(schema)
    augment = Augmenter(schema, {}, seed=0)

    out = augment(inputs)

    assert not augment and all(a is b for a, b in zip(out, inputs)) and out is not inputs


def test_wrong_number_of_inputs() -> None:
    schema, augment = _one(ModalityKind.IMAGE, "noise")
    with pytest.raises(ValueError, match="presence mask"):
        augment(_batch(schema)[:1])
