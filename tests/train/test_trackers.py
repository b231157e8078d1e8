"""logging.trackers with the real TensorBoard, MLflow (file store) and W&B (offline): each holds
every step's metrics once after a tiny run and a resume that re-trains logged steps."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from conftest import cli, small_recipe

pytest.importorskip("tensorboard", reason="logging.trackers needs the trackers extra: pip install -e '.[trackers]'")
pytest.importorskip("mlflow", reason="logging.trackers needs the trackers extra")
pytest.importorskip("wandb", reason="logging.trackers needs the trackers extra")


def wandb_history(folder) -> list[tuple[int, dict]]:
    """(step, values) of every history record in a W&B offline run's .wandb file: LevelDB log
    blocks of 32 KiB holding the run's protobuf records (read back without a W&B server)."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""  # 7 bytes: W&B's file header
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:  # the rest of the block is padding
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):  # a whole record, or a record's last piece
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "history":
                    out.append((record.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                                for i in record.history.item}))
    return out


def test_every_tracker_holds_each_step_once_across_a_resume(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = small_recipe(tmp_path, steps=8, save_every=5)
    recipe.write_text(recipe.read_text() + "logging:\n  trackers: [tensorboard, mlflow, wandb]\n")
    first = cli("run", str(recipe))
    assert first.returncode == 0, first.stderr
    assert "trackers: tensorboard --logdir" in first.stdout and "wandb offline run" in first.stdout
    assert "wandb:" not in first.stdout + first.stderr  # W&B's banner and summary kept out of the display
    again = cli("run", str(recipe), "--resume", "step-5")  # re-trains steps 6-8, which the trackers already hold
    assert again.returncode == 0, again.stderr
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in lines if "loss" in r}
    assert sorted(losses) == list(range(1, 9))

    events = EventAccumulator(str(run / "trackers" / "tensorboard")).Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, 9))
    assert [e.value for e in scalars] == pytest.approx([losses[s] for s in range(1, 9)], rel=1e-6)

    ids = json.loads((run / "trackers" / "ids.json").read_text())
    client = MlflowClient(tracking_uri=(run / "trackers" / "mlruns").as_uri())
    history = client.get_metric_history(ids["mlflow"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([losses[s] for s in range(1, 9)])
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.data.params["train.lr"] == "0.003" and mlrun.info.run_name == "run"
    assert "final_eval_loss" in mlrun.data.metrics
    assert {a.path for a in client.list_artifacts(ids["mlflow"])} >= {"recipe.yaml", "summary.json"}
    [experiment] = [e for e in client.search_experiments() if e.name == "gptj-tune"]
    assert len(client.search_runs([experiment.experiment_id])) == 1  # the resume continued the same run

    steps = [step for step, values in wandb_history(run / "trackers" / "wandb") if "loss" in values]
    assert steps == list(range(1, 9))

    evaluated = cli("eval", str(run), "--tasks", "none")  # the report goes to the same tracker runs
    assert evaluated.returncode == 0, evaluated.stderr
    assert {a.path for a in client.list_artifacts(ids["mlflow"])} >= {"report.md", "report.json", "loss.png"}
    assert "loss" in EventAccumulator(str(run / "trackers" / "tensorboard")).Reload().Tags()["images"]
    assert len({p.stem for p in (run / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")}) == 1  # one run id
    assert any(p.name == "report.md" for p in (run / "trackers" / "wandb").glob("offline-run-*/files/report.md"))


def test_a_tracker_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from gptj_tune.errors import RecipeError
    from gptj_tune.recipe import load_recipe
    from gptj_tune.train.track import check_trackers_installed

    recipe = small_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "logging:\n  trackers: [wandb]\n")
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package looks like to find_spec
    with pytest.raises(RecipeError, match=r"logging.trackers: wandb needs the wandb package; install it with: "
                                          r"pip install 'gptj-tune\[trackers\]'"):
        check_trackers_installed(load_recipe(recipe))


def test_a_run_with_gradient_checkpointing_and_trackers_prints_no_library_warnings(tmp_path):
    """transformers warned `gradient_checkpointing_enable is deprecated` on every checkpointed run;
    nothing a user cannot act on reaches the display."""
    recipe = small_recipe(tmp_path, steps=2, save_every=2)
    recipe.write_text(recipe.read_text() + "logging:\n  trackers: [tensorboard, mlflow]\n")
    result = cli("run", str(recipe), "--set", "model.gradient_checkpointing=true", own_process=True)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "warn" not in result.stdout.lower(), result.stderr


def test_nested_figures_such_as_benchmarks_during_training_reach_the_tracker(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptj_tune.recipe import load_recipe
    from gptj_tune.rundir import RunDir
    from gptj_tune.train.track import Trackers

    recipe = small_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "logging:\n  trackers: [tensorboard]\n")
    (tmp_path / "run").mkdir()
    trackers = Trackers(load_recipe(recipe), RunDir(tmp_path / "run"))
    trackers.log({"step": 10, "benchmarks": {"piqa": {"acc": 0.61, "acc_norm": 0.63}, "arc_easy": {"acc": 0.4}},
                  "benchmark_limit": 50, "note": "text is left out"})  # fmt: skip
    trackers.finish()
    events = EventAccumulator(str(tmp_path / "run" / "trackers" / "tensorboard")).Reload()
    assert {"benchmarks/piqa/acc", "benchmarks/piqa/acc_norm", "benchmarks/arc_easy/acc", "benchmark_limit"} <= set(events.Tags()["scalars"])
    assert events.Scalars("benchmarks/piqa/acc")[0].step == 10 and events.Scalars("benchmarks/piqa/acc")[0].value == pytest.approx(0.61)
