"""Experiment trackers (`logging.trackers`): TensorBoard, MLflow and W&B through accelerate's tracker
classes, on the main process. Every metrics.jsonl line goes to each, the frozen recipe as
hyperparameters, the run directory's name as the run name, the run's plots as artifacts.

Offline first: TensorBoard writes under `RUN/trackers/tensorboard`; MLflow to `RUN/trackers/mlruns`
unless MLFLOW_TRACKING_URI is set; W&B runs offline in `RUN/trackers` unless WANDB_MODE or
WANDB_API_KEY configures it. A resumed run continues the same tracker run (MLflow's run id and
W&B's id are kept in `RUN/trackers/ids.json`) and skips the steps it had already logged: resume is
exact, so those values are the ones the trackers hold.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
from pathlib import Path

from ..errors import RecipeError
from ..recipe import Recipe
from ..rundir import RunDir, atomic_write_text

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers_installed(recipe: Recipe) -> None:
    """A tracker whose package is missing: one line naming the extra, before anything is loaded."""
    missing = [name for name in recipe.logging.trackers if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise RecipeError([f"logging.trackers: {', '.join(missing)} needs the {' and '.join(PACKAGES[m] for m in missing)} "
                           f"package; install it with: pip install 'gptj-tune[trackers]' (or remove it from the list)"])  # fmt: skip


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
    def __init__(self, recipe: Recipe, run: RunDir, skip_through: int = 0):
        from accelerate import tracking

        self.skip_through = skip_through
        self.folder = run.path / "trackers"
        self.folder.mkdir(parents=True, exist_ok=True)
        ids_file = self.folder / "ids.json"
        ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
        new = not ids
        name, project = run.path.name, recipe.logging.project
        self.trackers = []
        for kind in recipe.logging.trackers:
            if kind == "tensorboard":
                tracker = tracking.TensorBoardTracker("tensorboard", str(self.folder))
            elif kind == "mlflow":
                import mlflow

                if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run directory: offline, nothing to set up
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x asks before using one
                    mlflow.set_tracking_uri((self.folder / "mlruns").resolve().as_uri())
                tracker = tracking.MLflowTracker(project, None, run_id=ids.get("mlflow"), run_name=name)  # artifacts in the store
            else:
                os.environ.setdefault("WANDB_SILENT", "true")  # its banner and summary would break the progress display
                mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
                ids.setdefault("wandb", _wandb_id())
                tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", project), name=name, id=ids["wandb"],
                                                resume="allow", dir=str(self.folder), mode=mode)  # fmt: skip
            if hasattr(tracker, "start"):  # accelerate >= 1.3 starts trackers after construction
                tracker.start()
            if kind == "mlflow":
                ids["mlflow"] = tracker.active_run.info.run_id
            self.trackers.append((kind, tracker))
        atomic_write_text(ids_file, json.dumps(ids))
        if new:
            config = flat_recipe(recipe)
            for _, tracker in self.trackers:
                tracker.store_init_configuration(config)
        self._open = True
        atexit.register(self.finish)

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
        for _, tracker in self.trackers:
            tracker.log(values, step=step)

    def artifacts(self, paths: list[Path]) -> None:
        """Files (the run's plots, an eval report) where the tracker keeps them: MLflow and W&B
        artifacts; in TensorBoard the PNGs as images."""
        for kind, tracker in self.trackers:
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
            for _, tracker in self.trackers:
                tracker.finish()


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
