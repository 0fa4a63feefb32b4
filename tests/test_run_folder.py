"""One run writes a run folder at a time: a second (a resume while the run goes on) is refused, with who holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedmm.config import RunConfig
from fedmm.errors import ConfigError
from fedmm.federation.artifacts import LOCK, RunArtifacts, check_run_folder, run_in_use

HOLD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fedmm.config import RunConfig
    from fedmm.federation.artifacts import RunArtifacts
    cfg = RunConfig(runs_dir=sys.argv[1], run_name="run", sites=2)
    artifacts = RunArtifacts(cfg, "run", resume=sys.argv[2] == "resume")
    artifacts.save_checkpoint(1, {"w": np.zeros(2, np.float32)}, {})
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes stdin, or kills this process
    """
)


def _holder(runs: Path, *, resume: bool = False) -> subprocess.Popen[str]:
    """Another process writing runs/run (as a running ServerApp does), once it says so."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(runs), "resume" if resume else "new"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "holding"
    return process


def test_a_run_being_written_cannot_be_resumed_by_another_process_until_it_ends(tmp_path: Path) -> None:
    cfg = RunConfig(runs_dir=str(tmp_path), run_name="run", sites=2, resume=True)
    holder = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError) as refused:
            RunArtifacts(cfg, "run", resume=True)
        message = str(refused.value)
        assert "run-name" in message and "being written by another run" in message and f"pid {holder.pid}" in message
        assert "Fix: wait for that run to end" in message
        lock_file = (tmp_path / "run" / LOCK).read_text()
        assert run_in_use(tmp_path / "run") is not None and f'"pid": {holder.pid}' in lock_file
        assert (tmp_path / "run" / LOCK).read_text() == lock_file  # looking did not write over who holds it
        with pytest.raises(ConfigError, match="being written by another run"):
            check_run_folder(tmp_path, "run", resume=True)  # what `fedmm simulate` asks before it loads anything
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(["checkpoint-1.npz", "checkpoint.json", "config.toml", LOCK])
    finally:
        holder.kill()  # SIGKILL: the operating system drops the lock with the process
        holder.wait(10)
    assert holder.returncode == -signal.SIGKILL and run_in_use(tmp_path / "run") is None
    resumed = RunArtifacts(cfg, "run", resume=True)
    try:
        assert resumed.load_checkpoint()[0] == 1
        assert f"{os.getpid()}" in (tmp_path / "run" / LOCK).read_text()  # the lock file names its holder
    finally:
        resumed.close()


def test_two_resumes_of_one_run_cannot_both_write_it(tmp_path: Path) -> None:
    cfg = RunConfig(runs_dir=str(tmp_path), run_name="run", sites=2)
    first = RunArtifacts(cfg, "run")
    first.save_checkpoint(1, {"w": np.zeros(2, np.float32)}, {})
    first.close()
    holder = _holder(tmp_path, resume=True)
    try:
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            RunArtifacts(cfg.replace(resume=True), "run", resume=True)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder ends normally: the lock goes with its open file
        holder.wait(10)
    RunArtifacts(cfg.replace(resume=True), "run", resume=True).close()


def test_in_one_process_a_second_writer_waits_for_close(tmp_path: Path) -> None:
    cfg = RunConfig(runs_dir=str(tmp_path), run_name="run", sites=2)
    first = RunArtifacts(cfg, "run")
    first.save_checkpoint(1, {"w": np.zeros(2, np.float32)}, {})
    with pytest.raises(ConfigError, match="being written by another run"):
        RunArtifacts(cfg.replace(resume=True), "run", resume=True)
    first.close()
    RunArtifacts(cfg.replace(resume=True), "run", resume=True).close()


def test_a_new_run_on_an_existing_folder_is_refused_with_the_fix(tmp_path: Path) -> None:
    cfg = RunConfig(runs_dir=str(tmp_path), run_name="run", sites=2)
    first = RunArtifacts(cfg, "run")
    first.save_checkpoint(1, {"w": np.zeros(2, np.float32)}, {})
    first.close()
    for refuse in (lambda: RunArtifacts(cfg, "run"), lambda: check_run_folder(tmp_path, "run", resume=False)):
        with pytest.raises(ConfigError) as refused:
            refuse()
        assert "exists already" in str(refused.value) and "resume=true" in str(refused.value)
    check_run_folder(tmp_path, "other", resume=False)  # a free name: nothing to say
    check_run_folder(tmp_path, "run", resume=True)  # a folder no one holds may be resumed


def test_a_resume_refused_before_the_engine_starts_leaves_the_run_folder_as_it_was(tmp_path: Path) -> None:
    """New-user findings of 3 Dec: resume=true of a completed run was refused only once Flower's engine ran, which had
    already rewritten the run's flower.log and presence.json (the status then listed made-up sites); a run stopped
    before its first checkpoint could be neither resumed nor started again under its name, each error pointing at the other."""
    from ledger_support import run_cli

    done = RunArtifacts(RunConfig(runs_dir=str(tmp_path), run_name="study", sites=2), "study")
    done.save_checkpoint(1, {"w": np.zeros(2, np.float32)}, {})
    done.close()
    (tmp_path / "study" / "flower.log").write_text("the run's own log\n")
    with pytest.raises(ConfigError, match=r"resume': run study already completed its 1 rounds \(rounds=1\).*Fix: raise rounds to train on \(e.g. rounds=11\)"):
        check_run_folder(tmp_path, "study", resume=True, rounds=1)
    check_run_folder(tmp_path, "study", resume=True, rounds=2)  # more rounds: fine

    code, output = run_cli("simulate", "--set", f"runs-dir={tmp_path}", "--set", "run-name=study", "--set", "resume=true", "--set", "rounds=1",
                           "--set", "data=synthetic:60", "--set", "sites=2")
    assert code == 2 and "already completed its 1 rounds" in output
    assert (tmp_path / "study" / "flower.log").read_text() == "the run's own log\n" and not (tmp_path / "study" / "presence.json").exists()

    cut = RunArtifacts(RunConfig(runs_dir=str(tmp_path), run_name="cut", sites=2), "cut")
    cut.close()  # stopped before its first round ended: no checkpoint
    with pytest.raises(ConfigError, match=r"exists already.*Fix: give this run another run-name \(that run stopped before its first checkpoint"):
        check_run_folder(tmp_path, "cut", resume=False)
    with pytest.raises(ConfigError, match=r"run cut has no checkpoint .* nothing to resume.*Fix: start it again under another run-name"):
        check_run_folder(tmp_path, "cut", resume=True, rounds=2)


def test_status_says_a_run_whose_server_is_gone_is_not_running(tmp_path: Path) -> None:
    """New-user finding of 3 Dec: after `fedmm simulate | head` (the pipe closed), a SIGHUP or kill -9, `fedmm status`
    said RUNNING for ever, though no process held the run folder."""
    from fedmm.cli.status import run_status

    artifacts = RunArtifacts(RunConfig(runs_dir=str(tmp_path), run_name="gone", sites=2), "gone")
    assert run_status(tmp_path / "gone").state == "running"  # held: the run goes on
    artifacts.save_checkpoint(2, {"w": np.zeros(2, np.float32)}, {})
    artifacts.close()  # as the operating system drops the lock of a killed process
    status = run_status(tmp_path / "gone")
    assert status.state == "failed" and "stopped without a word" in status.reason and "continues after round 2" in status.reason


def test_sighup_under_nohup_does_not_stop_a_run() -> None:
    """Review of 3 Dec: catching SIGHUP (a closed terminal stops a run as Ctrl-C does) overrode nohup's ignore."""
    code = textwrap.dedent(
        """
        import signal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        from fedmm.runtime.simulation import sigterm_as_interrupt
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a terminal's run
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_IGN, signal.SIG_DFL)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_a_run_in_its_first_round_is_not_called_stopped(tmp_path: Path) -> None:
    """Review of 3 Dec: a resume (or a new run) of a folder whose run was still in its first round was told the run had
    stopped, with the advice to start it again under another name: a second run, spending too."""
    running = RunArtifacts(RunConfig(runs_dir=str(tmp_path), run_name="first", sites=2), "first")  # no checkpoint yet
    try:
        for resume in (True, False):
            with pytest.raises(ConfigError, match="is being written by another run") as refused:
                check_run_folder(tmp_path, "first", resume=resume, rounds=2)
            assert "stopped" not in str(refused.value)
        with pytest.raises(ConfigError, match="is being written by another run"):
            RunArtifacts(RunConfig(runs_dir=str(tmp_path), run_name="first", sites=2), "first", resume=True)
    finally:
        running.close()


def test_a_run_whose_lock_file_was_removed_stops_checkpointing(tmp_path: Path) -> None:
    """As for a site's ledger: a removed run.lock lets a second run lock a new one and write the same folder."""
    from fedmm.errors import FederationError

    artifacts = RunArtifacts(RunConfig(runs_dir=str(tmp_path), run_name="run", sites=2), "run")
    artifacts.save_checkpoint(1, {"w": np.zeros(2, np.float32)}, {})
    (tmp_path / "run" / LOCK).unlink()
    with pytest.raises(FederationError, match=r"lock file run.lock was removed or replaced .* round 2 is not checkpointed"):
        artifacts.save_checkpoint(2, {"w": np.zeros(2, np.float32)}, {})
    artifacts.close()
