"""Starting a multi-process run: this machine's workers under torch's elastic launcher
(`torch.distributed.run`, the launcher under `accelerate launch`) or DeepSpeed's (a hostfile),
signals forwarded to them once, and the first failing worker's one-line error reported.

Under an outside launcher (torchrun, accelerate launch, deepspeed) the same entry point notices the
launcher's environment and runs as a worker. The engine itself is configured in train/engines.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import re
import tempfile
import time
from pathlib import Path

from rich.markup import escape

# torch is not imported here: `gptj-tune run` on a multi-process recipe only starts the launcher,
# and starts it ~1 s sooner without importing torch first.
from ..errors import RecipeError
from ..recipe import Recipe
from ..stages import warner
from .extension_builds import prepare_deepspeed_builds
from .workers import COMMAND_PID_ENV, ERROR_DIR_ENV, TIMEOUT_ENV, command_id, in_worker, is_running

# Ctrl-C, SIGTERM, and SIGHUP (the terminal closed): each stops the workers, after a checkpoint.
FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# How long a worker may still run after rank 0 finished the run.
EXIT_GRACE_S = 60.0
EXIT_GRACE_ENV = "GPTJ_TUNE_EXIT_GRACE_S"

def needs_launch(recipe: Recipe) -> bool:
    return recipe.distributed.world_size > 1 and not in_worker()


# ------------------------------------------------------------------------------------ launching


def launch(recipe: Recipe, argv: list[str], console) -> int:
    """Start this machine's workers running `gptj-tune <argv>` and wait; returns the exit code.

    Every worker that fails leaves its one-line error in a shared folder; the first is printed.
    The launcher stops all workers as soon as one fails, so a failure never turns into a hang.
    """
    d = recipe.distributed
    command = _launcher_command(recipe, argv)  # a bad hostfile is an error before any file is made
    console.print(
        f"Launching {d.num_processes} worker(s) on machine {d.machine_rank} of {d.num_machines} "
        f"({d.backend}, world size {d.world_size})"
    )
    # The launcher runs in its own session, so Ctrl-C (or a SIGTERM sent to this process) never
    # reaches it: torch's launcher would pass the signal on a second time and SIGKILL workers
    # still saving after 30 s. This process hands each signal to the workers, once. The handler is
    # in place before any file or process exists, so no signal can leave either behind.
    signalled: list[int] = []
    launcher: subprocess.Popen | None = None
    errors = ""

    def forward(signum, frame):
        signum = signal.SIGTERM if signum == getattr(signal, "SIGHUP", None) else signum  # the workers stop on SIGTERM
        signalled.append(signum)
        if launcher is None or launcher.returncode is not None:  # not started (it will not be), or ended
            return
        pid_files = list(Path(errors).glob("pid-*"))
        if not pid_files:  # still starting: nothing to save, stop the whole launch
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signum)
        for pid_file in pid_files:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        with tempfile.TemporaryDirectory(prefix="gptj-tune-errors-") as errors, tempfile.NamedTemporaryFile(
            "w+", prefix="gptj-tune-launcher-", suffix=".log", delete=False
        ) as log:
            code = None
            if d.backend == "deepspeed":
                prepare_deepspeed_builds(console)
            if not signalled:
                env = {**os.environ, ERROR_DIR_ENV: errors, COMMAND_PID_ENV: command_id(os.getpid()),
                       TIMEOUT_ENV: str(d.timeout_minutes), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
                launcher = subprocess.Popen(command, env=env, stderr=log, start_new_session=True)
                if signalled:  # it came while the launcher was being started
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(launcher.pid, signalled[0])
                code, stuck = end_stuck_workers(launcher, Path(errors))
                if stuck and code != 0 and not list(Path(errors).glob("rank-*.json")):  # none failed: the run is whole
                    warner(console)(f"rank(s) {', '.join(map(str, stuck))} still ran {_exit_grace():.0f} s after rank 0 "
                                    f"finished the run (stuck in its teardown) and were killed; the run is complete")  # fmt: skip
                    code = 0
            return _outcome(code, Path(errors), log, bool(signalled), console)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exit_grace() -> float:
    return float(os.environ.get(EXIT_GRACE_ENV) or EXIT_GRACE_S)


def end_stuck_workers(launcher: subprocess.Popen, errors: Path) -> tuple[int, list[int]]:
    """Wait for the launcher; returns its exit code and the ranks killed on the way. Once rank 0
    has finished the run (it left `done-0` with exit code 0: every rank had passed the run's last
    barrier, after which no rank has work left), a worker still running EXIT_GRACE_S later is stuck
    in its teardown, and the launcher would wait for it for good: it is killed. Seen in CI: a rank
    hung in gloo's process-group destructor, waiting on rank 0, which had exited. (On the other
    machines of a multi-machine job there is no rank 0 to watch: their launchers wait.)"""
    stuck: list[int] = []
    done = errors / "done-0"
    while True:
        try:
            return launcher.wait(timeout=1.0), stuck
        except subprocess.TimeoutExpired:
            pass
        if not _finished_before(done, time.time() - _exit_grace()):
            continue
        for pid_file in errors.glob("pid-*"):
            rank = int(pid_file.name.removeprefix("pid-"))
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if rank not in stuck and is_running(str(pid)):
                    os.kill(pid, signal.SIGKILL)
                    stuck.append(rank)


def _finished_before(done: Path, moment: float) -> bool:
    """Whether the rank of the `done-RANK` file left it, with exit code 0, before `moment`."""
    try:
        return done.read_text().strip() == "0" and done.stat().st_mtime < moment
    except OSError:
        return False


def _outcome(code: int | None, errors: Path, log, signalled: bool, console) -> int:
    """What a launch ended with (code None: stopped before it started), said once; the exit code.
    A rank that ended first without a message (killed, out of memory) is named before the errors
    it caused in the others."""
    reports = sorted(errors.glob("rank-*.json"), key=lambda p: p.stat().st_mtime) if code else []
    first = json.loads(reports[0].read_text()) if reports else None
    stopped = first["exit_code"] == 130 if first else signalled
    # The launcher's log (workers' stderr) is kept only for a failure, and only if it holds anything.
    kept = code is not None and code != 0 and not stopped and os.path.getsize(log.name) > 0
    if not kept:
        os.unlink(log.name)
    if code == 0:
        return 0
    died = _died_first(errors, log.name if kept else None) if code else None
    if first:
        message = escape(first["message"])  # verbatim, not markup
        if first.get("peer_lost") and died:  # the rank that died first, then the error it caused
            console.print(f"[red]error:[/] rank {died[0]} ended first, without a message ({died[1]}); rank {first['rank']} "
                          f"then {message}", soft_wrap=True)  # fmt: skip
        else:
            what = "[yellow]stopped[/]" if stopped else "[red]error[/]"
            console.print(f"{what} (rank {first['rank']}): {message}", soft_wrap=True)
        if kept:
            console.print(f"[dim]launcher log: {log.name}[/]")
        return int(first["exit_code"])
    if stopped:
        console.print("[yellow]stopped:[/] the workers ended on the signal before saving a checkpoint")
        return 130
    who = f"rank {died[0]} died without a message ({died[1]})" if died else "a worker died without a message (killed, or out of memory?)"
    if not kept:
        console.print(f"[red]error:[/] {who}; the launcher printed nothing")
        return code if code > 0 else 1
    log.seek(0)
    tail = log.read().splitlines()[-15:]
    console.print(f"[red]error:[/] {who}. Last lines of the launcher log:")
    console.print("\n".join(tail), markup=False, highlight=False)
    console.print(f"[dim]full log: {log.name}[/]")
    return code if code > 0 else 1


# One failure in torch's launcher's report ("Failures:" then "Root Cause"): its rank and exit code.
_FAILURE = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", re.M)


def _died_first(errors: Path, log_path: str | None) -> tuple[int, str] | None:
    """(rank, how) of the rank that ended first without leaving a message, from the pid files the
    workers left and the failures torch's launcher reports; None if every rank left a message.
    The launcher's "Root Cause" is not used: it is the failure it *observed* first, which can be a
    rank that failed on losing the silent one."""
    silent = sorted({int(p.name[4:]) for p in errors.glob("pid-*")} - {int(p.stem[5:]) for p in errors.glob("rank-*.json")})
    if not silent:
        return None
    text = ""
    if log_path:
        with open(log_path, errors="replace") as f:
            f.seek(max(0, os.path.getsize(log_path) - 200_000))
            text = f.read()
    report = text[text.rfind("Failures:") :] if "Failures:" in text else ""
    codes = {int(rank): int(code) for rank, code in _FAILURE.findall(report)}
    reported = [rank for rank in silent if rank in codes]
    if not reported:
        return silent[0], "killed, or out of memory?"
    rank = min(reported, key=lambda r: (codes[r] >= 0, r))  # one killed by a signal first
    exit_code = codes[rank]
    if exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else f"signal {-exit_code}"
        how = f"killed by {name}" + (": out of memory, or killed by hand?" if exit_code == -9 else "")
    else:
        how = f"exit code {exit_code}"
    return rank, how


def _launcher_command(recipe: Recipe, argv: list[str]) -> list[str]:
    d = recipe.distributed
    if d.hostfile is not None:
        hosts = read_hostfile(Path(d.hostfile))
        if len(hosts) != d.num_machines or set(hosts.values()) != {d.num_processes}:
            raise RecipeError([
                f"distributed.hostfile {d.hostfile} lists {len(hosts)} machine(s) with slots {sorted(set(hosts.values()))}; "
                f"the recipe says num_machines {d.num_machines} x num_processes {d.num_processes}: make them agree"
            ])  # fmt: skip
        return [
            sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={d.hostfile}",
            f"--master_addr={d.main_process_ip}", f"--master_port={d.main_process_port}",
            "--no_local_rank", *(["--no_ssh_check"] if len(hosts) == 1 else []),  # one machine: no ssh involved
            "--module", "gptj_tune", *argv,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={d.num_processes}", f"--nnodes={d.num_machines}", f"--node-rank={d.machine_rank}",
        f"--master-addr={d.main_process_ip}", f"--master-port={d.main_process_port}",
        "-m", "gptj_tune", *argv,
    ]  # fmt: skip


def read_hostfile(path: Path) -> dict[str, int]:
    """{host: slots} from an MPI-style hostfile; a clear error names the bad line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise RecipeError([f"distributed.hostfile: cannot read {path} ({e.strerror})"]) from None
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise RecipeError([f"distributed.hostfile: {path} line {number}: expected `HOST slots=N`, got {line!r}"])
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise RecipeError([f"distributed.hostfile: {path} lists no machine"])
    return hosts


