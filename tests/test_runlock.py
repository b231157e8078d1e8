"""One writer per run directory (runlock.py): a second run or a --resume while a run trains is
refused naming the holder; a lock left by a killed run is taken over with a note."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import cli, small_recipe, start_run_until

from gptj_tune.errors import RunDirError
from gptj_tune.runlock import STALE_AFTER, RunLock


def test_the_lock_names_its_holder_and_is_taken_over_only_when_the_holder_is_gone(tmp_path):
    run = tmp_path / "runs" / "a"
    first = RunLock(run)
    assert first.acquire() is None and first.path == tmp_path / "runs" / ".a.lock"
    with pytest.raises(RunDirError, match=rf"runs/a is in use by another gptj-tune run \(pid {os.getpid()} on "):
        RunLock(run).acquire()
    first.release()
    assert not first.path.exists()
    # a lock whose process has ended (same host): taken over, with a note
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first.path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "token": "x"}))
    second = RunLock(run)
    assert "whose process has ended" in second.acquire()
    assert json.loads(second.path.read_text())["token"] == second.token
    second.release()
    # another machine's lock: refused while it is touched, taken over once untouched for STALE_AFTER
    other = {"host": "elsewhere", "pid": 1, "started": time.time(), "token": "y"}
    first.path.write_text(json.dumps(other))
    with pytest.raises(RunDirError, match="pid 1 on elsewhere"):
        RunLock(run).acquire()
    old = time.time() - STALE_AFTER - 5
    os.utime(first.path, (old, old))
    third = RunLock(run)
    assert "untouched for" in third.acquire()
    third.release()
    # a release never removes a lock someone else holds now
    fourth = RunLock(run)
    fourth.acquire()
    RunLock(run).release()
    assert fourth.path.exists()
    fourth.release()


def test_a_lock_left_empty_by_a_stop_as_it_was_taken_is_removed_or_taken_over(tmp_path, monkeypatch):
    """A stop signal between creating `.NAME.lock` and writing its holder removes the file; a file
    left empty anyway (SIGKILL there) counts as alive for WRITE_GRACE seconds, then is taken over."""
    import gptj_tune.runlock as runlock
    from gptj_tune.heartbeat import WRITE_GRACE

    run = tmp_path / "runs" / "a"
    lock = RunLock(run)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(runlock.os, "fdopen", stopped)
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
    assert not lock.path.exists()
    lock.path.write_text("")  # what a SIGKILL at that moment leaves
    with pytest.raises(RunDirError, match="in use by another gptj-tune run"):
        RunLock(run).acquire()  # just created: its holder may be writing it now
    old = time.time() - WRITE_GRACE - 1
    os.utime(lock.path, (old, old))
    taker = RunLock(run)
    assert "left empty by a process stopped as it took the lock" in taker.acquire()
    assert json.loads(taker.path.read_text())["token"] == taker.token
    taker.release()


@pytest.mark.slow
def test_a_second_run_on_a_training_run_directory_is_refused_and_a_killed_ones_lock_taken_over(tmp_path):
    recipe = small_recipe(tmp_path, steps=400, save_every=5)
    proc = start_run_until(recipe, tmp_path / "run" / "checkpoints" / "step-5")
    try:
        for args in (["--resume", "latest"], ["--force"]):
            second = cli("run", str(recipe), *args)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"is in use by another gptj-tune run (pid {proc.pid} on {socket.gethostname()}" in second.stderr.replace("\n", " ")
        assert (tmp_path / "run" / "recipe.yaml").exists()  # --force deleted nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert (tmp_path / ".run.lock").exists()  # left by the killed run
    # (a different max_steps: the resume itself is then refused, after the lock was taken over and released)
    resumed = cli("run", str(recipe), "--resume", "latest", "--set", "train.max_steps=12")
    assert resumed.returncode == 2 and "the recipe differs" in resumed.stderr and "in use" not in resumed.stderr
    assert "took over the lock" in resumed.stdout.replace("\n", " ") and "whose process has ended" in resumed.stdout.replace("\n", " ")
    assert not (tmp_path / ".run.lock").exists()
