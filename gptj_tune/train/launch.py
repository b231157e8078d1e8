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
import tempfile
import time
from pathlib import Path

from rich.markup import escape

# torch is not imported here: `gptj-tune run` on a multi-process recipe only starts the launcher,
# and starts it ~1 s sooner without importing torch first.
from ..errors import RecipeError
from ..recipe import Recipe
from .extension_builds import prepare_deepspeed_builds

ERROR_DIR_ENV = "GPTJ_TUNE_ERROR_DIR"


def in_worker() -> bool:
    """True inside a process started by a distributed launcher."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


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

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="gptj-tune-errors-") as errors, tempfile.NamedTemporaryFile(
            "w+", prefix="gptj-tune-launcher-", suffix=".log", delete=False
        ) as log:
            code = None
            if d.backend == "deepspeed":
                prepare_deepspeed_builds(console)
            if not signalled:
                env = {**os.environ, ERROR_DIR_ENV: errors, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                launcher = subprocess.Popen(command, env=env, stderr=log, start_new_session=True)
                if signalled:  # it came while the launcher was being started
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(launcher.pid, signalled[0])
                code = launcher.wait()
            return _outcome(code, Path(errors), log, bool(signalled), console)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _outcome(code: int | None, errors: Path, log, signalled: bool, console) -> int:
    """What a launch ended with (code None: stopped before it started), said once; the exit code."""
    reports = sorted(errors.glob("rank-*.json"), key=lambda p: p.stat().st_mtime) if code else []
    first = json.loads(reports[0].read_text()) if reports else None
    stopped = first["exit_code"] == 130 if first else signalled
    # The launcher's log (workers' stderr) is kept only for a failure, and only if it holds anything.
    kept = code is not None and code != 0 and not stopped and os.path.getsize(log.name) > 0
    if not kept:
        os.unlink(log.name)
    if code == 0:
        return 0
    if first:
        what = "[yellow]stopped[/]" if stopped else "[red]error[/]"
        console.print(f"{what} (rank {first['rank']}): {escape(first['message'])}", soft_wrap=True)  # verbatim, not markup
        if kept:
            console.print(f"[dim]launcher log: {log.name}[/]")
        return int(first["exit_code"])
    if stopped:
        console.print("[yellow]stopped:[/] the workers ended on the signal before saving a checkpoint")
        return 130
    if not kept:
        console.print("[red]error:[/] a worker died without a message (killed, or out of memory?); the launcher printed nothing")
        return code if code > 0 else 1
    log.seek(0)
    tail = log.read().splitlines()[-15:]
    console.print("[red]error:[/] a worker died without a message (killed, or out of memory?). Last lines of the launcher log:")
    console.print("\n".join(tail), markup=False, highlight=False)
    console.print(f"[dim]full log: {log.name}[/]")
    return code if code > 0 else 1


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


def register_worker() -> None:
    """Called by each worker at start: leave its pid where the launching process forwards signals."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and in_worker():
        rank = int(os.environ.get("RANK", "0"))
        tmp = Path(folder) / f".pid-{rank}.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.replace(Path(folder) / f"pid-{rank}")


def report_worker_error(message: str, exit_code: int) -> None:
    """Called by a failing worker: leave its message where the launcher looks for it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "message": message, "exit_code": exit_code, "time": time.time()}
    tmp = Path(folder) / f".rank-{rank}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(Path(folder) / f"rank-{rank}.json")
