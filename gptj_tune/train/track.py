"""Experiment trackers (`logging.trackers`): TensorBoard, MLflow and W&B through accelerate's tracker
classes, on the main process. Every metrics.jsonl line goes to each, the frozen recipe as
hyperparameters, `logging.run_name` (else the run directory's name) as the run name and
`logging.tags` as its labels, the run's plots as artifacts.

Offline first: TensorBoard writes under `RUN/trackers/tensorboard`; MLflow to `RUN/trackers/mlruns`
unless MLFLOW_TRACKING_URI is set; W&B runs offline in `RUN/trackers` unless WANDB_MODE says
otherwise or W&B has a key (WANDB_API_KEY, or the netrc entry `wandb login` writes). A resumed
run continues the same tracker run (MLflow's run id and W&B's id are kept in
`RUN/trackers/ids.json`) and skips the steps it had already logged: resume is exact, so those
values are the ones the trackers hold.

A tracker never costs the run: one set to log to a server that does not answer stops `run` before
the model loads (`check_trackers`, a few seconds), one that cannot start is one line, and one that
fails during training is dropped with a warning (metrics.jsonl keeps every step).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
from pathlib import Path
from urllib.parse import urlparse

from ..errors import RecipeError, TrackerError, typed_first_line
from ..hub import PROBE_TIMEOUT, connects
from ..recipe import Recipe
from ..rundir import RunDir, atomic_write_text

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(recipe: Recipe) -> None:
    """Before anything is loaded: a tracker whose package is missing is one line naming the extra;
    one set to log to a server that does not answer within PROBE_TIMEOUT is one line saying how to
    fix it or log offline (MLflow's client would retry for about four minutes, W&B's for 90 s, and
    both then end in a traceback)."""
    missing = [name for name in recipe.logging.trackers if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise RecipeError([f"logging.trackers: {', '.join(missing)} needs the {' and '.join(PACKAGES[m] for m in missing)} "
                           f"package; install it with: pip install 'gptj-tune[trackers]' (or remove it from the list)"])  # fmt: skip
    for kind in recipe.logging.trackers:
        server = _server(kind, Path(recipe.output.dir) / "trackers")
        if server is not None and not connects(server[0]):
            raise TrackerError(f"logging.trackers: {kind} cannot reach {server[0]} (no connection within "
                               f"{PROBE_TIMEOUT:.0f} s): {server[1]}")  # fmt: skip


_OUR_STORES: set[str] = set()  # the run-directory stores this process gave MLflow


def _users_mlflow_uri() -> str:
    """MLFLOW_TRACKING_URI as the user set it: MLflow's set_tracking_uri writes the variable too, so
    a store of ours set earlier in this process (a test, a notebook) is not the user's choice."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return "" if uri in _OUR_STORES else uri


def _server(kind: str, folder: Path) -> tuple[str, str] | None:
    """(the server `kind` would log to, what to do when it does not answer); None when it logs to files."""
    if kind == "mlflow":
        uri = _users_mlflow_uri()
        if uri.split("://")[0] in ("http", "https"):
            return uri, (f"start the server or correct MLFLOW_TRACKING_URI, or unset it to log into "
                         f"{folder / 'mlruns'} (`mlflow ui --backend-store-uri` that folder)")  # fmt: skip
    elif kind == "wandb" and _wandb_mode() == "online":
        why = ("WANDB_MODE=online" if os.environ.get("WANDB_MODE") else "WANDB_API_KEY is set" if os.environ.get("WANDB_API_KEY")
               else f"`wandb login` saved a key for {_wandb_host()} in {_netrc_path()}")  # fmt: skip
        return _wandb_url(), (f"W&B logs online here ({why}); set WANDB_MODE=offline to log into {folder / 'wandb'} and "
                              f"`wandb sync` it later, or fix the network (or WANDB_BASE_URL) and the login (`wandb login`)")  # fmt: skip
    return None


def _wandb_mode() -> str:
    """WANDB_MODE, else online when W&B has a key (WANDB_API_KEY, or `wandb login`'s netrc entry), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") or _wandb_logged_in() else "offline"


def _wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def _wandb_host() -> str:
    return urlparse(_wandb_url()).hostname or ""


def _netrc_path() -> Path:
    return Path(os.environ.get("NETRC") or Path.home() / ".netrc")  # where `wandb login` keeps the key


def _wandb_logged_in() -> bool:
    import netrc

    try:
        return netrc.netrc(str(_netrc_path())).authenticators(_wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def last_logged_step(run: RunDir) -> int:
    """The highest step metrics.jsonl holds (read before a resume rewinds it)."""
    last = 0
    if run.metrics.exists():
        for line in run.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and "final_eval_loss" not in record:
                last = max(last, record["step"])
    return last


def flat_recipe(recipe: Recipe) -> dict:
    """The recipe as dotted keys to plain values (lists and nulls as text), for hyperparameter tables."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", recipe.model_dump(mode="json"))
    return out


class Trackers:
    def __init__(self, recipe: Recipe, run: RunDir, skip_through: int = 0, warn=None):
        """`warn(text)`: told when a tracker fails after it started (it is then dropped)."""
        self.skip_through, self.warn = skip_through, warn
        self.folder = run.path / "trackers"
        self.folder.mkdir(parents=True, exist_ok=True)
        ids_file = self.folder / "ids.json"
        ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
        new = not ids
        name, project = recipe.logging.run_name or run.path.name, recipe.logging.project
        self.tags, self.entity = list(recipe.logging.tags), recipe.logging.entity
        config = flat_recipe(recipe) if new else None
        self.trackers, self._open = [], True
        for kind in recipe.logging.trackers:
            try:
                tracker = self._start(kind, ids, name, project)
                if config is not None:
                    tracker.store_init_configuration(config)
            except Exception as e:  # a server that refuses (a wrong key, not an MLflow server), a bad setting
                self.finish()
                fix = (_server(kind, self.folder) or ("", "check the tracker's settings, or remove it from the list"))[1]
                raise TrackerError(f"logging.trackers: {kind} could not start: {_first_line(e)}. Fix: {fix}") from None
            self.trackers.append((kind, tracker))
        atomic_write_text(ids_file, json.dumps(ids))
        atexit.register(self.finish)

    def _start(self, kind: str, ids: dict, name: str, project: str):
        """Start one tracker; the ids of MLflow's and W&B's runs go into `ids` (kept for a resume)."""
        from accelerate import tracking

        if kind == "tensorboard":
            tracker = tracking.TensorBoardTracker("tensorboard", str(self.folder))
        elif kind == "mlflow":
            import mlflow

            uri = _users_mlflow_uri()
            if not uri:  # a file store in the run directory: offline, nothing to set up
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x asks before using one
                uri = (self.folder / "mlruns").resolve().as_uri()
                _OUR_STORES.add(uri)
            mlflow.set_tracking_uri(uri)  # (also when set: an earlier run's own store, in this process, would win)
            tracker = tracking.MLflowTracker(project, None, run_id=ids.get("mlflow"), run_name=name)  # artifacts in the store
        else:
            os.environ.setdefault("WANDB_SILENT", "true")  # its banner and summary would break the progress display
            ids.setdefault("wandb", _wandb_id())
            extra = {"entity": self.entity} if self.entity else {}
            tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", project), name=name, id=ids["wandb"], tags=self.tags,
                                            resume="allow", dir=str(self.folder), mode=_wandb_mode(), **extra)  # fmt: skip
        if hasattr(tracker, "start"):  # accelerate >= 1.3 starts trackers after construction
            tracker.start()
        if kind == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
            if self.tags:  # on the run only (accelerate's `tags` would also label a new experiment)
                import mlflow

                mlflow.set_tags({tag: "" for tag in self.tags})
        return tracker

    def where(self) -> str:
        """Where each tracker writes, for the console."""
        places = []
        for kind, tracker in self.trackers:
            if kind == "tensorboard":
                places.append(f"tensorboard --logdir {tracker.logging_dir}")
            elif kind == "mlflow":
                import mlflow

                places.append(f"mlflow run {tracker.active_run.info.run_id} at {mlflow.get_tracking_uri()}")
            else:
                places.append(f"wandb {tracker.run.settings.mode} run {tracker.run.id} in {tracker.run.dir}")
        return "; ".join(places)

    def log(self, record: dict) -> None:
        """One metrics line; steps a resumed run had already logged are skipped (the final line never is)."""
        step = record.get("step")
        if not isinstance(step, int) or (step <= self.skip_through and "final_eval_loss" not in record):
            return
        values = _numbers({k: v for k, v in record.items() if k != "step"})
        for kind, tracker in list(self.trackers):
            try:
                tracker.log(values, step=step)
            except Exception as e:  # its server went away (after the client's retries): training goes on
                self._drop(kind, tracker, f"logging step {step}", e)

    def _drop(self, kind: str, tracker, doing: str, error: Exception, close: bool = True) -> None:
        self.trackers.remove((kind, tracker))
        try:
            if close:
                tracker.finish()
        except Exception:
            pass
        if self.warn is not None:
            self.warn(f"{kind} failed {doing} and logs no more in this run ({_first_line(error)}); metrics.jsonl "
                      f"holds every step")  # fmt: skip

    def artifacts(self, paths: list[Path]) -> None:
        """Files (the run's plots, an eval report) where the tracker keeps them: MLflow and W&B
        artifacts; in TensorBoard the PNGs as images."""
        for kind, tracker in list(self.trackers):
            try:
                self._artifacts(kind, tracker, paths)
            except Exception as e:
                self._drop(kind, tracker, f"storing {', '.join(p.name for p in paths)}", e)

    @staticmethod
    def _artifacts(kind: str, tracker, paths: list[Path]) -> None:
        for path in paths:
            if kind == "mlflow":
                import mlflow

                mlflow.log_artifact(str(path))
            elif kind == "wandb":
                tracker.run.save(str(path), base_path=str(path.parent), policy="now")
            elif path.suffix == ".png":
                import matplotlib.image

                tracker.writer.add_image(path.stem, matplotlib.image.imread(path)[..., :3], dataformats="HWC")
                tracker.writer.flush()

    def finish(self) -> None:
        if self._open:
            self._open = False
            for kind, tracker in list(self.trackers):
                try:
                    tracker.finish()
                except Exception as e:
                    self._drop(kind, tracker, "closing its run", e, close=False)


def _first_line(error: Exception) -> str:
    """`Type: the message's first line` (at most 300 characters), without a closing full stop."""
    text = typed_first_line(error).rstrip(".")
    return text if len(text) <= 300 else text[:297] + "..."


def _numbers(record: dict, prefix: str = "") -> dict:
    """The numbers of a metrics line, nested ones (benchmarks during training) as `benchmarks/piqa/acc`."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def _wandb_id() -> str:
    import secrets

    return secrets.token_hex(4)
