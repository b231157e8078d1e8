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
    return [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            for r in wandb_records(folder) if r.WhichOneof("record_type") == "history"]  # fmt: skip


def wandb_records(folder) -> list:
    """Every protobuf record of the W&B offline runs under `folder`, in order."""
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
                out.append(record)
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
    from gptj_tune.train.track import check_trackers

    recipe = small_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "logging:\n  trackers: [wandb]\n")
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package looks like to find_spec
    with pytest.raises(RecipeError, match=r"logging.trackers: wandb needs the wandb package; install it with: "
                                          r"pip install 'gptj-tune\[trackers\]'"):
        check_trackers(load_recipe(recipe))


def test_a_run_with_gradient_checkpointing_and_trackers_prints_no_library_warnings(tmp_path):
    """transformers warned `gradient_checkpointing_enable is deprecated` on every checkpointed run;
    nothing a user cannot act on reaches the display."""
    recipe = small_recipe(tmp_path, steps=3, save_every=3)  # 3 steps: past the recipe's 2-step warmup, which would be a warning
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


def test_the_run_name_tags_and_wandb_entity_reach_the_trackers(tmp_path):
    from mlflow.tracking import MlflowClient

    from gptj_tune.recipe import load_recipe
    from gptj_tune.rundir import RunDir
    from gptj_tune.train.track import Trackers

    recipe = small_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "logging:\n  trackers: [mlflow, wandb]\n  run_name: lr-sweep-3e-3\n"
                      "  tags: [sweep, alpaca]\n  entity: my-team\n")  # fmt: skip
    (tmp_path / "run").mkdir()
    trackers = Trackers(load_recipe(recipe), RunDir(tmp_path / "run"))
    trackers.log({"step": 1, "loss": 2.5})
    trackers.finish()
    folder = tmp_path / "run" / "trackers"
    ids = json.loads((folder / "ids.json").read_text())
    client = MlflowClient(tracking_uri=(folder / "mlruns").as_uri())
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.run_name == "lr-sweep-3e-3" and {"sweep": "", "alpaca": ""}.items() <= mlrun.data.tags.items()
    [experiment] = [e for e in client.search_experiments() if e.name == "gptj-tune"]
    assert "sweep" not in experiment.tags  # the run is labelled, not the experiment
    [run] = [r.run for r in wandb_records(folder / "wandb") if r.WhichOneof("record_type") == "run"][:1]
    assert (run.display_name, list(run.tags), run.entity) == ("lr-sweep-3e-3", ["sweep", "alpaca"], "my-team")


@pytest.mark.parametrize("line, message", [
    ("tags: [sweep, sweep]", "logging.tags names a tag twice"),
    ("tags: ['  ']", "logging.tags: '  ' is empty"),
    ("run_name: ''", "run_name"),
])  # fmt: skip
def test_bad_tracker_labels_are_recipe_errors(tmp_path, line, message):
    from gptj_tune.errors import RecipeError
    from gptj_tune.recipe import load_recipe

    recipe = small_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + f"logging:\n  trackers: [tensorboard]\n  {line}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["mlflow", "wandb", "wandb-login", "mlflow-ddp"])
def test_a_tracker_server_that_does_not_answer_stops_the_run_in_seconds_before_anything_is_written(tmp_path, monkeypatch, kind):
    """MLflow's client retried an unreachable MLFLOW_TRACKING_URI for ~250 s and W&B online for 90 s,
    each after the model had loaded, and both ended in a traceback. `wandb-login`: the key is the
    netrc entry `wandb login` writes, not WANDB_API_KEY; it logs online as well (it used to log
    offline without a word)."""
    import time

    url, login, ddp = f"http://127.0.0.1:{closed_port()}", kind == "wandb-login", kind == "mlflow-ddp"
    kind = kind.removesuffix("-ddp")
    if kind == "mlflow":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    else:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1\n  login user\n  password " + "0" * 40 + "\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc if login else tmp_path / "none"))
        if kind == "wandb":
            monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
        kind = "wandb"
    recipe = small_recipe(tmp_path, steps=2, save_every=2)
    recipe.write_text(recipe.read_text() + f"logging:\n  trackers: [tensorboard, {kind}]\n")
    if ddp:  # checked once by the launching command, before any worker starts
        recipe.write_text(recipe.read_text() + "distributed:\n  backend: ddp\n  num_processes: 2\n")
    started = time.monotonic()
    result = cli("run", str(recipe))
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    message = " ".join(result.stderr.split())
    assert f"logging.trackers: {kind} cannot reach {url} (no connection within 3 s):" in message, message
    fix = "unset it to log into" if kind == "mlflow" else "set WANDB_MODE=offline to log into"
    assert fix in message and "Traceback" not in result.stderr
    if login:
        assert f"`wandb login` saved a key for 127.0.0.1 in {tmp_path / 'netrc'}" in message, message
    assert not (tmp_path / "run").exists() and "Launching" not in result.stdout and "rank" not in result.stderr


def test_a_server_that_is_not_the_trackers_is_one_line_and_the_run_starts_again_without_force(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI at a web server that is not MLflow's (a wrong port): the real MLflow client
    gets an HTTP error; the run stops in one line, and once the variable is fixed the same command
    starts again (nothing was trained, so no --force)."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        recipe = small_recipe(tmp_path, steps=2, save_every=2)
        recipe.write_text(recipe.read_text() + "logging:\n  trackers: [tensorboard, mlflow]\n")
        result = cli("run", str(recipe))
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "logging.trackers: mlflow could not start: MlflowException: API request to endpoint" in message and "501" in message, message
    assert "Fix: start the server or correct MLFLOW_TRACKING_URI" in message and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    again = cli("run", str(recipe))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "mlflow run" in again.stdout
    # eval sends its report to the run's trackers at the end: it checks them before it starts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    evaluated = cli("eval", str(tmp_path / "run"), "--tasks", "none")
    assert evaluated.returncode == 2 and "logging.trackers: mlflow cannot reach" in evaluated.stderr, evaluated.stderr
    assert not (tmp_path / "run" / "eval").exists()


def test_a_tracker_that_fails_during_training_is_dropped_with_a_warning_and_the_run_finishes(tmp_path):
    """The MLflow store removed after step 2 (a server gone, a deleted experiment): its next log raises
    in the real client. Before, that exception ended the run; now the tracker is dropped with one
    warning, the others and metrics.jsonl keep every step."""
    import io
    import shutil

    from rich.console import Console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptj_tune.recipe import load_recipe
    from gptj_tune.train.loop import train

    recipe = small_recipe(tmp_path, steps=6, save_every=6)
    recipe.write_text(recipe.read_text() + "logging:\n  trackers: [mlflow, tensorboard]\n")
    store = tmp_path / "run" / "trackers" / "mlruns"

    def remove_the_store(step: int) -> None:
        if step == 2:
            shutil.rmtree(store)

    out = io.StringIO()
    result = train(load_recipe(recipe), console=Console(file=out, width=200), after_each_step=remove_the_store)
    assert result is not None and result.steps == 6
    text = out.getvalue()
    assert text.count("warning: mlflow failed logging step 3 and logs no more in this run (") == 1, text
    assert "metrics.jsonl holds every step" in text
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(range(1, 7)) <= set(steps)
    events = EventAccumulator(str(tmp_path / "run" / "trackers" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
