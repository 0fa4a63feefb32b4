"""Smoke federations through Flower's simulation engine, as a user runs them."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from fedmm.cli.status import run_status
from fedmm.config import RunConfig
from fedmm.data.avmnist import builtin_root, load_test
from fedmm.federation.artifacts import run_in_use
from fedmm.models import ModelRecipe
from fedmm.plan import batch_size

FEDMM = str(Path(sys.executable).parent / "fedmm")
FLOWER_PROCESS_MARKS = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server", "ray::")


def _flower_processes() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(mark in cmdline for mark in FLOWER_PROCESS_MARKS):
                found.add(int(entry.name))
    return found


def _simulate(tmp_path: Path, *settings: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", COLUMNS="200")
    return subprocess.run(
        [FEDMM, "simulate", *flags, "--set", f"runs-dir={json.dumps(str(tmp_path))}", *[a for s in settings for a in ("--set", s)]],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )


def test_two_rounds_three_sites_through_flower(tmp_path: Path) -> None:
    before = _flower_processes()

    done = _simulate(tmp_path, "rounds=2", "sites=3", "local-epochs=1", 'run-name="smoke"', "accountant=\"rdp\"")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 2/2: accuracy" in done.stdout and "final accuracy" in done.stdout
    # each run's simulated ledgers start empty (no site-state-dir): no warning that a budget fits one study
    assert "DP plan" in done.stdout and "whole study" not in done.stdout
    run_dir = tmp_path / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_id"] == "smoke" and summary["rounds"] == 2 and summary["sites"] == 3
    assert summary["dp"] is True and summary["secure_aggregation"] is False
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["delta"] == 1e-5 and summary["accountant"] == "rdp" and summary["wall_seconds"] > 0
    sites = json.loads((run_dir / "privacy.json").read_text())["sites"]
    assert sorted(s["site"] for s in sites) == ["george", "jackson", "lucas"]
    assert summary["max_epsilon"] == max(s["epsilon"] for s in sites)  # a maximum, never an average
    assert all(0 < s["epsilon"] <= 8.0 and s["steps"] == 2 * math.ceil(250 / batch_size(RunConfig())) and s["noise_multiplier"] > 0 for s in sites)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["accuracy"] == summary["final_accuracy"]
    assert rounds[0]["max_epsilon"] < rounds[1]["max_epsilon"]
    assert "macro-F1" in done.stdout and all(sorted(r["participants"]) == ["george", "jackson", "lucas"] for r in rounds)
    assert rounds[-1]["macro_f1"] == summary["final_macro_f1"] and summary["confusion"] == rounds[-1]["confusion"] and len(summary["classes"]) == 10
    assert summary["best_round"] in (1, 2) and (run_dir / "model-best.pt").is_file() and (run_dir / "model.pt").is_file()
    resolved = RunConfig.from_run_config(tomllib.loads((run_dir / "config.toml").read_text()))
    assert resolved.rounds == 2 and resolved.sites == 3
    # every "auto" as the run resolved it (fedmm.plan.RunPlan.resolved)
    assert (resolved.model, resolved.image_encoder, resolved.learning_rate, resolved.partitioner) == ("concat", "scattering", 0.5, "natural")
    assert resolved.noise_multiplier is None  # decided per site, from its data: privacy.json has each
    recipe = ModelRecipe.from_config(resolved)
    recipe.build(recipe.prepare(load_test(builtin_root())).schema).load_state_dict(torch.load(run_dir / "model.pt"))
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["model"] == "concat" and card["encoders"]["image"]["encoder"] == "ScatteringImageEncoder" and card["parameters"] == 64478 and set(card["encoders"]) == {"image", "audio"}
    assert card["dp_replacements"] == [] and card["layout_fingerprint"]
    federation = json.loads((run_dir / "federation.json").read_text())
    assert federation["plan"]["partitioner"] == "natural" and list(federation["sites"]) == ["george", "jackson", "lucas"]
    assert all(s["samples"] == 250 and s["per_modality"] == {"image": 250, "audio": 250} for s in federation["sites"].values())
    assert "ActorPool" not in (run_dir / "flower.log").read_text()  # the sites ran in this process: no Ray workers to start
    assert _flower_processes() <= before  # nothing left running


def test_with_ray_the_sites_run_in_flowers_ray_workers(tmp_path: Path) -> None:
    before = _flower_processes()

    done = _simulate(tmp_path, "rounds=1", "sites=2", 'run-name="ray"', flags=("--ray",))

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Constructed ActorPool with" in (tmp_path / "ray" / "flower.log").read_text()
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["rounds"] == 1
    assert _flower_processes() <= before


def test_sites_train_on_a_manifest_with_missing_modalities_and_augmentation(tmp_path: Path) -> None:
    manifest = Path(__file__).resolve().parents[1] / "fedmm" / "data" / "builtin" / "manifest-example" / "manifest.csv"

    done = _simulate(
        tmp_path, f"data={json.dumps('manifest:' + str(manifest))}", "sites=3", "rounds=2", 'run-name="manifest"', "batch-size=16",
        'augment="image:shift+rotate,audio:specaugment,text:dropout"', "missing-modality-sample-p=0.2",
    )

    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "manifest"
    federation = json.loads((run_dir / "federation.json").read_text())
    assert list(federation["sites"]) == ["george", "jackson", "theo"]  # natural: the manifest's site column
    for counts in federation["sites"].values():
        assert counts["samples"] == 40 and sum(counts["per_class"].values()) == 40
        assert counts["per_modality"]["audio"] < 40 and counts["modality_cells_dropped"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["max_epsilon"] <= 8.0 and 0.0 <= summary["final_accuracy"] <= 1.0


def test_a_failing_site_fails_the_run_with_its_reason(tmp_path: Path) -> None:
    # A site that cannot keep its privacy ledger fails closed, and so does the run.
    before = _flower_processes()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the sites' state folder should be")

    done = _simulate(tmp_path, "rounds=1", "sites=2", f"site-state-dir={json.dumps(str(blocker))}", 'run-name="failing"')

    assert done.returncode == 1
    # a lasting site-state-dir holds ledgers made with `fedmm ledger init`; none can be there (it is a file)
    assert "no privacy ledger at" in done.stdout and "fedmm ledger init" in done.stdout and str(blocker) in done.stdout
    assert not (tmp_path / "failing" / "summary.json").exists()
    # why, on record in the run folder (a deployment has no flower.log there): fedmm status says it
    failure = json.loads((tmp_path / "failing" / "failure.json").read_text())
    assert failure["status"] == "failed" and "no privacy ledger at" in failure["reason"], failure
    status = run_status(tmp_path / "failing")
    assert status.state == "failed" and "no privacy ledger at" in status.reason
    # A failed run still records what its sites spent: here nothing (no site could keep a ledger).
    assert json.loads((tmp_path / "failing" / "privacy.json").read_text())["sites"] == []
    assert "privacy spent before the failure: no site reported a spend" in done.stdout
    assert _flower_processes() <= before


def test_a_site_stops_at_its_own_budget_and_the_federation_goes_on(tmp_path: Path) -> None:
    # The federation is planned for epsilon 4 over 8 rounds; george's own budget is 2, which
    # (RDP, 4 steps a round) affords it one round.
    before = _flower_processes()

    done = _simulate(tmp_path, "rounds=8", "sites=2", "target-epsilon=4.0", 'site-budgets="george:2"', 'run-name="budget"')

    assert done.returncode == 0, done.stdout + done.stderr
    assert "site george refuses round" in done.stdout and "its lifetime epsilon-budget=2" in done.stdout  # what the server reads
    assert "over its budget epsilon-budget=2" in done.stdout + done.stderr  # which limit, with the figures: the site's own log
    run_dir = tmp_path / "budget"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 8 and summary["stopped"] is None
    sites = {s["site"]: s for s in json.loads((run_dir / "privacy.json").read_text())["sites"]}
    assert 0 < sites["george"]["epsilon"] <= 2.0 and "refuses round" in sites["george"]["refused"]
    assert 2.0 < sites["jackson"]["epsilon"] <= 4.0 and sites["jackson"]["refused"] is None

    audit = subprocess.run([FEDMM, "audit", str(run_dir / "sites"), "--json"], capture_output=True, text=True, timeout=120, check=False)

    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = {s["site"]: s for s in json.loads(audit.stdout)["sites"]}
    assert report["george"]["chain_ok"] and report["george"]["epsilon"] <= report["george"]["epsilon_budget"] == 2.0
    assert report["george"]["epsilon"] == pytest.approx(sites["george"]["epsilon"])
    assert report["george"]["ledger_seq"] == sites["george"]["ledger_seq"]  # the server's witness agrees
    assert _flower_processes() <= before


@pytest.mark.parametrize("setting", ["roundz=2", "target-delta=2.0"])
def test_bad_settings_exit_2_without_starting_flower(tmp_path: Path, setting: str) -> None:
    done = _simulate(tmp_path, setting)

    assert done.returncode == 2
    assert setting.split("=")[0] in done.stdout


def test_secure_aggregation_with_distributed_client_noise_through_flower(tmp_path: Path) -> None:
    # SecAgg+ on Flower's legacy workflow inside the real simulation engine; george's own
    # budget (3; a round costs about 2.6 here) ends its part after its first round, and the
    # two others go on under SecAgg+.
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent, rdp
    from opacus.accountants.rdp import RDPAccountant

    before = _flower_processes()

    done = _simulate(
        tmp_path, "rounds=3", "sites=3", "target-epsilon=4.0", 'site-budgets="george:3"', "secure-aggregation=true",
        "client-dp=true", 'client-noise="distributed"', "client-noise-multiplier=0.5", 'run-name="secure"',
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "site george refuses round 2" in done.stdout and "secure aggregation (SecAgg+)" in done.stdout
    run_dir = tmp_path / "secure"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["client_dp"] is True and summary["rounds"] == 3
    reference = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    reference.compose(SelfComposedDpEvent(GaussianDpEvent(0.5), 3))
    assert summary["client_epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=0.01)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites"] for r in rounds] == [3, 2, 2] and all(r["dropped"] == 0 and r["rejected"] == 0 for r in rounds)
    sites = {s["site"]: s for s in json.loads((run_dir / "privacy.json").read_text())["sites"]}
    assert "refuses round 2" in sites["george"]["refused"] and sites["george"]["epsilon"] <= 3.0

    audit = subprocess.run([FEDMM, "audit", str(run_dir / "sites"), "--json"], capture_output=True, text=True, timeout=120, check=False)

    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert {s["site"]: len(s["entries"]) for s in json.loads(audit.stdout)["sites"]} == {"george": 1, "jackson": 3, "lucas": 3}
    assert _flower_processes() <= before


@pytest.mark.parametrize(("stop", "flags"), [(signal.SIGINT, ()), (signal.SIGTERM, ()), (signal.SIGTERM, ("--superlink",))], ids=["ctrl-c", "sigterm", "sigterm-superlink"])
def test_ctrl_c_or_sigterm_stops_the_run_at_once_and_says_what_it_left(tmp_path: Path, stop: signal.Signals, flags: tuple[str, ...]) -> None:
    # Before: Ctrl-C ended Flower's engine but the ServerApp's thread kept waiting for replies (the
    # process never exited); SIGTERM killed the process without a word (and, with --superlink, left
    # the private SuperLink's temporary folder behind).
    before = _flower_processes()
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", COLUMNS="200")
    out = tmp_path / "out.txt"
    command = [FEDMM, "simulate", *flags, "--set", f"runs-dir={json.dumps(str(tmp_path))}", "--set", "rounds=40", "--set", 'run-name="cut"']
    with out.open("w") as sink:
        # a terminal's Ctrl-C: SIGINT as Python handles it by default (a shell's background job would ignore it)
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while "round 2/40" not in out.read_text():
            assert process.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        # A careless operator resumes the run while it still goes on: refused before anything starts (it used
        # to run a second federation on the same folder, interleaving the two runs' metrics and checkpoints)
        second = _simulate(tmp_path, "rounds=40", 'run-name="cut"', "resume=true", flags=flags)
        said = " ".join(second.stdout.split())  # as one line, whatever the terminal's width
        assert second.returncode == 2 and "being written by another run" in said and "Fix: wait for that run to end" in said, second.stdout + second.stderr
        assert not (tmp_path / "cut" / "flower.log").exists() and process.poll() is None  # nothing of the refused run's, and the run goes on
        process.send_signal(stop)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"still running 60 s after {stop.name}:\n{out.read_text()[-2000:]}")
    text = out.read_text()
    assert code == 130, text[-3000:]
    run_dir = tmp_path / "cut"
    assert "interrupted (Ctrl-C, SIGTERM or SIGHUP): last checkpoint after round" in text
    if flags:  # the ServerApp's own process was stopped with the SuperLink: the sites' ledgers hold the spends
        assert f"each site's spends are in its ledger: fedmm audit {run_dir / 'sites'}" in text
    else:
        assert "privacy spent so far: " in text and (run_dir / "privacy.json").is_file()
    checkpoint = json.loads((run_dir / "checkpoint.json").read_text())
    assert checkpoint["round"] >= 2 and (run_dir / "flower.log").is_file()
    assert not (run_dir / "summary.json").exists()  # not a finished run
    assert run_in_use(run_dir) is None  # stopped, however: the run may be resumed
    deadline = time.monotonic() + 30  # the engine's processes (--superlink: SuperLink, SuperExec, Ray) are gone
    while _flower_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _flower_processes() - before
