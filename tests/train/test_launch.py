"""The launching side of a multi-process run (train/launch.py, train/extension_builds.py): workers
end without the interpreter's teardown; a rank killed without a message is named from the
launcher's report; DeepSpeed's stale extension-build locks are found and removed without touching
a live build's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,code", [(["recipes"], 0), (["run", "missing.yaml"], 2)])
def test_a_worker_ends_without_the_interpreter_teardown(tmp_path, args, code):
    """A worker's objects are not finalized at exit (DeepSpeed leaves a destroyed process group in a
    module global, and gloo can abort while the interpreter tears it down), but atexit handlers run,
    output arrives whole and the exit code is the command's. Outside a worker, teardown is normal."""
    script = (
        "import atexit, sys\n"
        "from pathlib import Path\n"
        "from gptj_tune import cli\n"
        "out = Path(sys.argv[1])\n"
        "class Leftover:\n"
        "    def __del__(self): (out / 'finalized').write_text('x')\n"
        "cli.LEFTOVER = Leftover()\n"
        "atexit.register(lambda: (out / 'atexit').write_text('x'))\n"
        "sys.argv = ['gptj-tune', *sys.argv[2:]]\n"
        "cli.main()\n"
    )
    for worker in (True, False):
        out = tmp_path / ("worker" if worker else "plain")
        out.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE")}
        if worker:
            env |= {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "RANK": "0"}
        result = subprocess.run([sys.executable, "-c", script, str(out), *args], capture_output=True, text=True,
                                cwd=tmp_path, env=env, timeout=120)  # fmt: skip
        assert result.returncode == code, result.stdout + result.stderr
        assert ("quickstart" in result.stdout) if code == 0 else ("missing.yaml" in result.stderr)
        assert (out / "atexit").exists()
        assert (out / "finalized").exists() is not worker


def test_only_build_locks_no_process_holds_are_stale(tmp_path):
    """torch's extension builder waits forever on a `lock` file; its holder keeps the file open. A
    lock nobody has open (its build was killed) is stale; one a live process holds is not."""
    from gptj_tune.train.extension_builds import stale_build_locks

    stale = [tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "cpu_adam" / "lock"]
    held = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    for lock in [*stale, held]:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os,sys,time; fd = os.open({str(held)!r}, os.O_RDONLY); print(1, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "1"
        assert sorted(stale_build_locks(tmp_path)) == sorted(stale)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(stale_build_locks(tmp_path)) == sorted([*stale, held])  # its holder is gone
    assert stale_build_locks(tmp_path / "nothing-built-yet") == []


def test_deepspeed_launch_clears_stale_locks_and_announces_the_first_build(tmp_path, monkeypatch):
    from rich.console import Console

    from gptj_tune.train.launch import prepare_deepspeed_builds

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    console = Console(record=True, width=300)
    prepare_deepspeed_builds(console)
    said = console.export_text()
    assert not lock.exists() and f"removed a lock left by an interrupted extension build, which DeepSpeed would have waited on forever: {lock}" in said
    assert "compiles its CPU all-reduce op on first use" in said  # nothing built under this root yet
    (lock.parent / "deepspeed_shm_comm.so").touch()
    console = Console(record=True, width=300)
    prepare_deepspeed_builds(console)
    assert console.export_text() == ""  # built, no lock: nothing to say


@pytest.mark.parametrize("root", [0, 1])
def test_the_silent_rank_is_named_from_the_launchers_report_whichever_failure_it_saw_first(tmp_path, root):
    """torch's launcher names as "Root Cause" the failure it observed first, which on a loaded
    machine can be rank 0's lost connection rather than rank 1's SIGKILL (seen in CI)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from gptj_tune.train.launch import _died_first

    failures = {0: ProcessFailure(0, 100, 1, str(tmp_path / "none")), 1: ProcessFailure(1, 101, -9, str(tmp_path / "none"))}
    failures[0].timestamp, failures[1].timestamp = (1, 2) if root == 0 else (2, 1)
    report = ChildFailedError("gptj_tune.train.worker", failures).format_msg()
    assert f"rank      : {root} " in report.split("Root Cause (first observed failure):")[1]
    log = tmp_path / "launcher.log"
    log.write_text("W1205 launcher warnings\n" + report + "\n")
    errors = tmp_path / "errors"
    errors.mkdir()
    for rank in (0, 1):
        (errors / f"pid-{rank}").write_text("1")
    (errors / "rank-0.json").write_text("{}")  # rank 0 left its message; rank 1 did not
    assert _died_first(errors, str(log)) == (1, "killed by SIGKILL: out of memory, or killed by hand?")
    assert _died_first(errors, None) == (1, "killed, or out of memory?")  # no log kept: the rank, not how
    (errors / "rank-1.json").write_text("{}")
    assert _died_first(errors, str(log)) is None
