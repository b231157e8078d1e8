"""The launching side of a multi-process run (train/launch.py, train/extension_builds.py): workers
end without the interpreter's teardown; a rank killed without a message is named from the
launcher's report; DeepSpeed's stale extension-build locks are found and removed without touching
a live build's; a failing worker ends the job with its message; Ctrl-C while workers start stops the
whole launch; the launching process does not import torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, write_recipe
from two_processes import FULL, RECIPE, own_tmpdir, recipe_file, run_args


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


@pytest.mark.slow
def test_a_failing_worker_ends_the_job_with_its_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "input": ""}\n')
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(method=FULL, steps=4).replace(
        "[{format: synthetic, count: 600}]", f"[{{format: alpaca, path: {bad}}}]"))  # fmt: skip
    started = time.time()
    temp, env = own_tmpdir(tmp_path)
    result = cli("run", str(recipe), *run_args(tmp_path / "run", "ddp"), timeout=180, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    # Both ranks meet the bad record (rank 1 through the data build it waited for): the first
    # report written is shown, from either rank (seen both ways in CI).
    assert "error (rank 0)" in result.stdout or "error (rank 1)" in result.stdout, result.stdout
    assert "bad.jsonl:2" in result.stdout and "output" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert time.time() - started < 120  # rank 1 was waiting for the data: it was stopped, not left hanging
    # The launcher's log is kept only when it holds something, and then the message names it.
    logs = list(temp.glob("gptj-tune-launcher-*.log"))
    assert all(log.stat().st_size > 0 and str(log) in result.stdout.replace("\n", "") for log in logs), logs


def test_the_launching_process_does_not_import_torch(tmp_path):
    """`gptj-tune run` on a multi-process recipe only reads the recipe and starts the launcher: the
    workers import torch, transformers and peft; the process that waits for them does not."""
    recipe = recipe_file(tmp_path)
    code = (
        "import sys\n"
        "from gptj_tune import cli, recipe\n"
        "from gptj_tune.train import launch\n"
        f"r = recipe.load_recipe({str(recipe)!r}, ['distributed.backend=ddp', 'distributed.num_processes=2'])\n"
        "assert launch.needs_launch(r)\n"
        "launch._launcher_command(r, ['run'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_lock_left_by_a_killed_deepspeed_build_does_not_hang_the_next_run(tmp_path):
    """A DeepSpeed build killed with its lock taken (a timeout, SIGKILL) left every later DeepSpeed
    run on the machine waiting at start, silently and forever (torch's builder waits on the file;
    CI lost an hour to it). The launch removes such a lock first, and says so."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    lock.touch()  # as a killed build leaves it: nobody holds it
    try:
        recipe = recipe_file(tmp_path, steps=2)
        result = cli("run", str(recipe), *run_args(tmp_path / "run", "deepspeed", 2), timeout=300)
    finally:
        lock.unlink(missing_ok=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "removed a lock left by an interrupted extension build" in result.stdout
    assert str(lock) in result.stdout.replace("\n", "")
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["launcher-starting", "workers-importing"])
def test_ctrl_c_while_workers_start_stops_the_whole_launch(tmp_path, when):
    """Nothing to save yet: every process of the launch ends promptly, exit 130, reported as a stop
    (not as whatever error an import cut short turns into), none left behind. `launcher-starting`:
    the signal lands before any worker runs our code; `workers-importing`: once every worker has
    registered, while it imports torch and transformers."""
    recipe = recipe_file(tmp_path, steps=500)
    temp, env = own_tmpdir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "gptj_tune", "run", str(recipe), *run_args(tmp_path / "run", "ddp")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        folders = list(temp.glob("gptj-tune-errors-*"))
        if folders and (when == "launcher-starting" or len(list(folders[0].glob("pid-*"))) == 2):
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "stopped" in out + err and "error" not in out + err, out[-2000:] + err[-2000:]
    time.sleep(1)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_mentions(p, str(tmp_path))]
    assert not left, left
    assert not list(temp.glob("gptj-tune-launcher-*")), "a stopped launch leaves no launcher log"


def _cmdline_mentions(proc_dir, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
