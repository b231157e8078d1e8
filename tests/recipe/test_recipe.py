"""The Recipe schema: shipped recipes validate; bad ones give specific, located messages."""

from __future__ import annotations

import re

import pytest
from conftest import RECIPES, REPO, cli, write_recipe

from gptj_tune.errors import RecipeError
from gptj_tune.recipe import LoraMethod, load_recipe, reference_markdown

SHIPPED = sorted(RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.description, f"{path.name} needs a one-line description"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# Run: gptj-tune run recipes/" + path.name), first_line


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_frozen_as_a_run_freezes_it_validates_again(path, tmp_path):
    # Before, a run of any model but tiny-gptj froze `model.tiny` (its defaults) beside the hub
    # model, which the schema refuses: export, eval and generate of such runs failed to read it.
    from gptj_tune.rundir import is_frozen_recipe

    frozen = tmp_path / "recipe.yaml"
    frozen.write_text(load_recipe(path).to_yaml())
    again = load_recipe(frozen)
    assert again == load_recipe(path) and is_frozen_recipe(frozen)
    assert ("tiny:" in frozen.read_text()) == (again.model.name_or_path == "tiny-gptj")


def test_defaults_and_output_dir_from_file_name(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "my-run.yaml", "{}\n"))
    assert recipe.output.dir == "runs/my-run"
    assert isinstance(recipe.method, LoraMethod) and recipe.method.r == 16
    assert recipe.data.packing is True and recipe.train.lr == 2e-4


def test_unknown_key_names_line_and_suggests_fix(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "train:\n  lrr: 1.0e-4\n  batch_size: 2\n")
    with pytest.raises(RecipeError, match=r"`train\.lrr` \(line 2\): unknown key; did you mean `lr`\?"):
        load_recipe(path)


def test_all_problems_reported_at_once(tmp_path):
    text = "model:\n  dtype: fp8\ntrain:\n  batch_size: lots\nmethod:\n  kind: lora\n  rr: 4\n"
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml", text))
    message = str(info.value)
    assert "3 problem(s)" in message
    assert re.search(r"`model\.dtype` \(line 2\): Input should be .*'float32'.*got 'fp8'", message)
    assert re.search(r"`train\.batch_size` \(line 4\): .*integer.*got 'lots'", message)
    assert "`method.rr` (line 7): unknown key; did you mean `r`?" in message


def test_wrong_values_checks_across_sections_and_missing_paths_are_reported_in_one_pass(tmp_path):
    """Checks across sections ran only once every field was valid, and the data paths only after them:
    a user fixed one problem to be shown the next. Now one pass, in the file's order."""
    recipe = write_recipe(tmp_path / "r.yaml", """\
model:
  tiny: {context: 64}
train:
  lr: abc
  optimizer: adamw_8bit
data:
  max_length: 256
  sources: [{format: alpaca, path: ./nope.json}]
distributed: {backend: fsdp, num_processes: 2}
""")
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, check_paths=True)
    assert [p.split(":")[0] for p in e.value.problems] == [
        "`train.lr` (line 4)", "`train.optimizer` (line 5)", "`data.max_length` (line 7)", "`data.sources.0.path` (line 8)"]
    assert "adamw_8bit runs on single and ddp; fsdp shards" in e.value.problems[1]
    assert "longer than the tiny model's context (model.tiny.context 64)" in e.value.problems[2]


def test_a_source_switched_from_synthetic_on_the_command_line_is_told_how_to_drop_count():
    with pytest.raises(RecipeError) as caught:
        load_recipe(RECIPES / "quickstart.yaml", ["data.sources.0.format=alpaca", "data.sources.0.path=/data/alpaca.json"])
    message = str(caught.value)
    assert "`count` only applies to format synthetic" in message
    assert "--set data.sources.0.count=null" in message and "--set 'data.sources=[...]'" in message
    fixed = load_recipe(RECIPES / "quickstart.yaml", ["data.sources.0.format=alpaca", "data.sources.0.path=/data/alpaca.json",
                                                      "data.sources.0.count=null"])  # fmt: skip
    assert fixed.data.sources[0].format == "alpaca" and fixed.data.sources[0].count is None


def test_a_check_across_sections_is_filed_under_the_key_it_names(tmp_path):
    """Not `(top level)`: the key the message starts with, and its line (or --set)."""
    text = "model:\n  tiny: {context: 128}\ndata:\n  sources: [{format: synthetic}]\n  max_length: 400\n"
    with pytest.raises(RecipeError, match=r"`data\.max_length` \(line 5\): data\.max_length 400 is longer than the tiny model"):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))
    with pytest.raises(RecipeError, match=r"`data\.max_length` \(from --set\): data\.max_length 300"):
        load_recipe(write_recipe(tmp_path / "r.yaml", text), ["data.max_length=300"])


def test_method_kind_is_a_tagged_union(tmp_path):
    with pytest.raises(RecipeError, match=r"`method\.kind` \(line 2\): got 'qlorah'; expected one of 'full', 'lora', 'qlora'"):
        load_recipe(write_recipe(tmp_path / "r.yaml", "method:\n  kind: qlorah\n"))
    with pytest.raises(RecipeError, match=r"`method\.r` \(line 3\): a setting of method\.kind lora and qlora, not of full; remove it$"):
        load_recipe(write_recipe(tmp_path / "r.yaml", "method:\n  kind: full\n  r: 8\n"))
    with pytest.raises(RecipeError, match=r"`method\.rr` \(line 3\): unknown key; did you mean `r`"):
        load_recipe(write_recipe(tmp_path / "r.yaml", "method:\n  kind: lora\n  rr: 8\n"))


def test_a_method_switched_on_the_command_line_is_told_how_to_drop_the_old_kinds_settings():
    """`--set method.kind=full` on a LoRA recipe: each LoRA key says whose setting it is, and the
    one-line fix the message gives runs."""
    with pytest.raises(RecipeError) as caught:
        load_recipe(RECIPES / "quickstart.yaml", ["method.kind=full"])
    problems = caught.value.problems
    assert problems[0] == ("`method.r` (line 8): a setting of method.kind lora and qlora, not of full; "
                           "give the whole section instead, e.g. --set 'method={kind: full}'")  # fmt: skip
    assert {p.split("`")[1] for p in problems} == {"method.r", "method.alpha", "method.dropout", "method.modules_to_save"}
    assert load_recipe(RECIPES / "quickstart.yaml", ["method={kind: full}"]).method.kind == "full"


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  warmup_steps: 10\n  warmup_ratio: 0.1\n", "can't set both train.warmup_steps and train.warmup_ratio"),
        ("train:\n  epochs: 2\n  max_steps: 10\n", "can't set both train.epochs and train.max_steps"),
        ("data:\n  sources:\n    - format: alpaca\n", r"`data\.sources\[0\]` \(line 3\): `path` is required for format alpaca"),
        ("data:\n  sources:\n    - {format: jsonl, path: x.jsonl}\n", "format jsonl needs `prompt_field`"),
        ("data:\n  sources:\n    - {format: synthetic, path: x}\n", "`path` is not used with format synthetic"),
        ("model:\n  name_or_path: EleutherAI/gpt-j-6b\n  tiny: {layers: 2}\n", "model.tiny only shapes the built-in.*on the command line: --set model.tiny=null"),
        ("model:\n  tiny: {width: 30, heads: 4}\n", r"width \(30\) must be divisible by model.tiny.heads"),
        ("data:\n  template: {prompt: 'Q: {question}'}\n", "may use only"),
        ("train:\n  compile: true\ndistributed:\n  backend: fsdp\n  num_processes: 2\n", "train.compile works with distributed.backend single or ddp, not fsdp"),
    ],
)
def test_contradictions_are_errors(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))


def test_overrides(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "train:\n  lr: 1.0e-3\n")
    recipe = load_recipe(path, ["train.lr=1e-4", "data.max_length=256", "data.packing=false", "method.kind=full"])
    assert recipe.train.lr == 1e-4 and recipe.data.max_length == 256 and recipe.data.packing is False
    assert recipe.method.kind == "full"
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["data.sources.0.count=100"])
    assert recipe.data.sources[0].count == 100
    with pytest.raises(RecipeError, match=r"`train\.lrr` \(from --set\): unknown key; did you mean `lr`"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.lr"])
    # One past the end of a list adds an entry, field by field; further is an error naming the length.
    mixed = load_recipe(RECIPES / "quickstart.yaml", ["data.sources.1.format=text", "data.sources.1.path=/books",
                                                      "data.sources.1.weight=0.5"])  # fmt: skip
    assert [(s.format, s.path, s.weight) for s in mixed.data.sources] == [("synthetic", None, 1.0), ("text", "/books", 0.5)]
    with pytest.raises(RecipeError, match=r"`data.sources` has 1 entry, so index 3 is past its end; use 0 to 1"):
        load_recipe(RECIPES / "quickstart.yaml", ["data.sources.3.path=x"])
    for key in ("=3", "train..lr=3"):
        with pytest.raises(RecipeError, match="the key has an empty part"):
            load_recipe(path, [key])


def test_local_paths_relative_to_the_working_directory_are_frozen_absolute(tmp_path, monkeypatch):
    # A run's export, eval and generate read its frozen recipe from any directory; before, a
    # `--set` data path or a relative model folder stayed relative to where `run` was typed.
    (tmp_path / "work" / "models" / "gj").mkdir(parents=True)
    (tmp_path / "work" / "d.jsonl").write_text("{}\n")
    (tmp_path / "recipes").mkdir()
    recipe = write_recipe(tmp_path / "recipes" / "r.yaml", "model: {name_or_path: models/gj, tokenizer: models/gj}\n")
    monkeypatch.chdir(tmp_path / "work")
    loaded = load_recipe(recipe, ["data.sources=[{format: alpaca, path: d.jsonl}]"])
    assert loaded.model.name_or_path == loaded.model.tokenizer == str(tmp_path / "work" / "models" / "gj")
    assert loaded.data.sources[0].path == str(tmp_path / "work" / "d.jsonl")
    hub = load_recipe(recipe, ["model.name_or_path=EleutherAI/gpt-j-6b", "model.tokenizer=null"])
    assert hub.model.name_or_path == "EleutherAI/gpt-j-6b"  # no such folder here: a hub id, left as written


def test_yaml_is_loaded_safely(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="line 1: not valid YAML"):
        load_recipe(path)


def test_recipe_is_read_only(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", "{}\n"))
    with pytest.raises(Exception):
        recipe.train.lr = 1.0  # type: ignore[misc]


def test_validate_command_exit_codes(tmp_path):
    good = cli("validate", str(RECIPES / "quickstart.yaml"))
    assert good.returncode == 0, good.stderr
    assert "name_or_path: tiny-gptj" in good.stdout and "valid" in good.stderr
    bad = cli("validate", str(write_recipe(tmp_path / "bad.yaml", "trian: {}\n")))
    assert bad.returncode == 2
    assert "`trian` (line 1): unknown key; did you mean `train`?" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_validate_writes_the_resolved_recipe_whole_when_saved_to_a_file(tmp_path):
    """`gptj-tune validate r.yaml > resolved.yaml`: the YAML whole (piped output was cut at 80
    columns: a long data path and a description lost their ends), and nothing else on stdout."""
    folder = tmp_path / ("a_rather_long_folder_name_" * 4) / "and_another_level_of_folders_below_it"
    folder.mkdir(parents=True)
    data = folder / "alpaca_records_with_a_long_name.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    description = "a description long enough to pass the edge of any eighty-column terminal, and then some more words"
    recipe = write_recipe(tmp_path / "r.yaml", f"description: {description}\n"
                          f"data:\n  sources:\n    - {{format: alpaca, path: {data}}}\n")  # fmt: skip
    result = cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr
    saved = write_recipe(tmp_path / "resolved.yaml", result.stdout)
    again = load_recipe(saved)
    assert again.data.sources[0].path == str(data) and again.description == description
    assert again.to_yaml() == result.stdout and "valid" in result.stderr


def test_values_that_pass_the_types_but_cannot_run_are_refused_with_their_bounds_in_one_pass(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "model:\n  tiny: {width: 100000000000, layers: 100000}\ntrain:\n  lr: 50\n"
                          "  batch_size: 10000000\ndata:\n  max_length: 100000000\n")  # fmt: skip
    result = cli("validate", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for line in ("`model.tiny.width` (line 2): Input should be less than or equal to 16384",
                 "`model.tiny.layers` (line 2): Input should be less than or equal to 256",
                 "`train.lr` (line 4): Input should be less than or equal to 1",
                 "`train.batch_size` (line 5): Input should be less than or equal to 65536",
                 "`data.max_length` (line 7): Input should be less than or equal to 1048576"):  # fmt: skip
        assert line in result.stderr, result.stderr


def test_validate_and_run_refuse_a_local_data_path_that_does_not_exist(tmp_path):
    """A path that can only be local (a data file suffix, `./`, an absolute path) is checked by
    `validate` and `run`; a bare name (`novels`, `tatsu-lab/alpaca`) may be a hub id and is left to the run."""
    recipe = write_recipe(tmp_path / "r.yaml", "data:\n  sources:\n    - format: alpaca\n      path: data/alpaca.json\n"
                          f"output: {{dir: {tmp_path / 'run'}}}\n")  # fmt: skip
    for command in ("validate", "run"):
        result = cli(command, str(recipe))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "`data.sources.0.path` (line 4): data/alpaca.json does not exist (a relative path is looked for beside " \
               "the recipe file, then in the current directory)" in result.stderr  # fmt: skip
    assert not (tmp_path / "run").exists()
    result = cli("validate", str(recipe), "--set", "data.sources.0.path=/no/such/file.jsonl")
    assert result.returncode == 2 and "`data.sources.0.path` (from --set): /no/such/file.jsonl does not exist" in result.stderr
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "alpaca.json").write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    assert cli("validate", str(recipe)).returncode == 0
    assert load_recipe(write_recipe(tmp_path / "hub.yaml", "data:\n  sources:\n    - {format: alpaca, path: tatsu-lab/alpaca}\n"),
                       check_paths=True).data.sources[0].path == "tatsu-lab/alpaca"  # fmt: skip


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty: write the sections to change (`{}` for every default)"),
    ("# only a comment\n", "the file is empty"),
    ("train:\n  lr: 1e-4\n  batch_size: 2\n  lr: 3e-4\n", "`train.lr` is given twice (lines 2 and 4); keep one"),
    ("train: {lr: 1e400}\n", "`train.lr` (line 1): Input should be a finite number"),
    ("data: {eval_fraction: .nan}\n", "`data.eval_fraction` (line 1): Input should be a finite number"),
    ("x: &a [*a]\n", "`x` (line 1): unknown key"),  # a list holding itself: was a 1,009-line RecursionError
])  # fmt: skip
def test_empty_files_repeated_keys_and_infinite_numbers_are_errors(tmp_path, text, message):
    path = write_recipe(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert message in str(raised.value)
    result = cli("validate", str(path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_recipes_list_and_copy(tmp_path):
    listing = cli("recipes")
    assert listing.returncode == 0
    for path in SHIPPED:
        assert path.stem in listing.stdout
    dest = tmp_path / "mine.yaml"
    assert cli("recipes", "copy", "quickstart", str(dest)).returncode == 0
    assert dest.read_text() == (RECIPES / "quickstart.yaml").read_text()
    again = cli("recipes", "copy", "quickstart", str(dest))
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = cli("recipes", "copy", "nope", str(tmp_path / "x.yaml"))
    assert missing.returncode == 2 and "no shipped recipe 'nope'" in missing.stderr
    into = cli("recipes", "copy", "quickstart", str(tmp_path))  # a folder: the copy goes inside, like cp
    assert into.returncode == 0 and (tmp_path / "quickstart.yaml").read_text() == dest.read_text()
    below = cli("recipes", "copy", "quickstart", str(dest / "x.yaml"))
    assert below.returncode == 2 and "mine.yaml is a file, not a folder" in below.stderr and "Traceback" not in below.stderr


def test_a_folder_or_a_binary_file_given_as_the_recipe_is_a_one_line_error(tmp_path):
    folder = cli("validate", str(tmp_path))
    assert folder.returncode == 2 and f"{tmp_path} is a folder; give a recipe file" in folder.stderr
    (tmp_path / "r.yaml").write_bytes(b"\xff\xfe model: {}")
    binary = cli("validate", str(tmp_path / "r.yaml"))
    assert binary.returncode == 2 and "not UTF-8 text (byte 0)" in binary.stderr
    assert "Traceback" not in folder.stderr + binary.stderr


@pytest.mark.slow
def test_messages_print_paths_and_hints_verbatim_not_as_rich_markup(tmp_path):
    # rich reads "[draft]" or ".[eval]" as a style tag and drops it; every message is escaped
    missing = cli("run", str(tmp_path / "[draft]-v2.yaml"))
    assert missing.returncode == 2 and f"file not found: {tmp_path}/[draft]-v2.yaml;" in missing.stderr
    folder = tmp_path / "[v2]"
    folder.mkdir()
    copied = cli("recipes", "copy", "quickstart", str(folder))
    assert copied.returncode == 0 and f"gptj-tune run {folder}/quickstart.yaml" in copied.stdout.replace("\n", "")


def test_the_recipe_reference_is_generated_from_the_schema():
    reference = (REPO / "docs" / "recipe-reference.md").read_text()
    start, end = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"
    assert start in reference and end in reference, "docs/recipe-reference.md needs the generated recipe reference"
    embedded = reference.split(start)[1].split(end)[0]
    assert embedded == reference_markdown(), "docs/recipe-reference.md is stale: run `gptj-tune recipes reference`"


@pytest.fixture(scope="module")
def tiny_gpt_neo_with_gpt2_tokenizer(tmp_path_factory, gpt2_tokenizer):
    """A two-layer GPT-Neo on the real GPT-2 tokenizer, saved like a hub checkpoint."""
    from conftest import save_tiny_gpt_neo

    return save_tiny_gpt_neo(tmp_path_factory.mktemp("neo") / "model", gpt2_tokenizer)


# Shipped recipes that read data, each run for a few steps on the real data under ../shared/data with
# a tiny model in its place (`neo`: the tiny GPT-Neo above; `tiny`: the built-in tiny GPT-J).
DATA_RECIPES = {
    "soft-prompt": ("neo", "domain", "PROMPT_TUNING"),
    "novel-domain": ("tiny", "domain", "LORA"),
    "dolly-lora": ("tiny", "dolly/dolly_sample_train20.jsonl", "LORA"),
    "gpt-neo-125m-alpaca": ("neo", "alpaca/alpaca_2k.json", None),
    "alpaca-qlora": ("tiny", "alpaca/alpaca_2k.json", "LORA"),  # a 4-bit base (bitsandbytes on the CPU)
    "gpt-neo-2.7b-qlora": ("neo", "alpaca/alpaca_2k.json", "LORA"),  # GPT-Neo's module names, 4-bit
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATA_RECIPES))
def test_shipped_data_recipes_run_on_the_real_data_with_a_tiny_model(name, tmp_path, shared_data, tiny_gpt_neo_with_gpt2_tokenizer):
    import json

    model, data, adapter = DATA_RECIPES[name]
    model_args = (["--set", "model.name_or_path=tiny-gptj", "--set", "model.tiny.layers=2", "--set", "model.tiny.width=64"]
                  if model == "tiny" else ["--set", f"model.name_or_path={tiny_gpt_neo_with_gpt2_tokenizer}"])  # fmt: skip
    result = cli(
        "run", str(RECIPES / f"{name}.yaml"), *model_args,
        "--set", "model.revision=null", "--set", "model.dtype=float32", "--set", "model.gradient_checkpointing=false",
        "--set", f"data.sources.0.path={shared_data / data}", "--set", "data.max_length=128",
        "--set", "train.epochs=null", "--set", "train.max_steps=3", "--set", "train.log_every=1", "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
        "--set", "train.warmup_steps=1", "--set", "train.save_every=3", "--set", "eval.generate_samples=2",
        "--set", f"output.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    final = tmp_path / "run" / "final"
    if adapter:
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == adapter
    else:
        assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
