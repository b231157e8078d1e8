"""Writes that replace whole or not at all (rundir.atomic_dir, rundir.atomic_write)."""

import pytest

from gptj_tune.rundir import atomic_dir, atomic_write


class Boom(Exception):
    pass


def test_a_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    target = tmp_path / "eval"
    with atomic_dir(target) as tmp:
        (tmp / "report.json").write_text("first")
    assert (target / "report.json").read_text() == "first"
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "report.json").write_text("half")
            raise Boom
    assert (target / "report.json").read_text() == "first"  # the earlier folder is untouched
    with atomic_dir(target) as tmp:
        (tmp / "other.md").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["other.md"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temp or old folder left


def test_a_failed_folder_write_leaves_no_parents_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "kept" / "a" / "b" / "report"):
            raise Boom
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_a_failed_file_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "r.json"
    atomic_write(path, lambda tmp: tmp.write_text("old"))

    def fail(tmp):
        tmp.write_text("partial")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_resume_compares_model_tiny_only_for_the_tiny_model():
    # Run directories frozen before model.tiny was left out for other models still resume.
    import yaml
    from conftest import RECIPES

    from gptj_tune.recipe import load_recipe
    from gptj_tune.rundir import _recipe_diff

    hub = load_recipe(RECIPES / "alpaca-lora.yaml").to_yaml()
    old = yaml.safe_load(hub)
    old["model"]["tiny"] = {"layers": 4, "width": 128}
    assert _recipe_diff(yaml.safe_dump(old), hub) == ""
    tiny = load_recipe(RECIPES / "quickstart.yaml").to_yaml()
    other = yaml.safe_load(tiny)
    other["model"]["tiny"]["width"] = 64
    assert _recipe_diff(yaml.safe_dump(other), tiny) == f"model.tiny.width (64 -> {yaml.safe_load(tiny)['model']['tiny']['width']})"


def test_a_run_killed_before_its_first_checkpoint_gets_one_way_forward(tmp_path):
    """Killed before its first checkpoint: `run` said "use --resume" and `--resume` said "start it
    again without --resume", a circle. Both now say --force."""
    from conftest import cli, small_recipe

    recipe = small_recipe(tmp_path, steps=400, save_every=100)
    run = tmp_path / "run"
    run.mkdir()
    from gptj_tune.recipe import load_recipe

    (run / "recipe.yaml").write_text(load_recipe(recipe).to_yaml())  # what a killed run leaves: its recipe and steps
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.5}\n{"step": 2, "loss": 6.3}\n')
    again = cli("run", str(recipe))
    assert again.returncode == 2 and "stopped before its first checkpoint, so there is nothing to resume: start it " \
        f"again with --force (deletes {run})" in again.stderr.replace("\n", " ")  # fmt: skip
    resumed = cli("run", str(recipe), "--resume")
    assert resumed.returncode == 2 and f"start it again with --force (deletes {run})" in resumed.stderr.replace("\n", " ")
    assert "use --resume" not in again.stderr.lower() + resumed.stderr.lower()
