"""`gptj-tune export`: merged HF folders that load with plain transformers and give the trained
model's logits; adapter-only; atomicity; the model card. (ZeRO-3 and FSDP shards consolidated by
export: train/test_distributed.py, on the sharded runs it makes anyway.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import cli, file_contents, small_recipe

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def _logits_in_fresh_process(folder, adapter_base=None) -> torch.Tensor:
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as M\n"
        "ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])\n"
        "m = M.from_pretrained(sys.argv[1]) if sys.argv[2] == '-' else __import__('peft').PeftModel.from_pretrained("
        "M.from_pretrained(sys.argv[2]), sys.argv[1])\n"
        "torch.save(m(input_ids=ids).logits, sys.argv[3])\n"
    )
    out = folder.parent / f"{folder.name}-logits.pt"
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(adapter_base or "-"), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out)


def _peft_logits(run) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base-model"), run / "final")
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exportrun")
    assert cli("run", str(small_recipe(tmp, steps=12, save_every=6))).returncode == 0
    return tmp / "run"


@pytest.mark.slow
def test_lora_export_is_merged_and_gives_the_peft_logits(tmp_path, lora_run):
    result = cli("export", str(lora_run), "--out", str(tmp_path / "m"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified: reloaded in a fresh process" in result.stdout
    import re  # each long part said with its time, in order (a 6B export takes minutes)

    stages = re.findall(r"^(loaded the model as trained|merged the adapter and wrote the float32 weights|reloaded the export "
                        r"in a fresh process and compared its logits)\b.*: \d+\.\d s$", result.stdout, flags=re.M)  # fmt: skip
    assert stages == ["loaded the model as trained", "merged the adapter and wrote the float32 weights",
                      "reloaded the export in a fresh process and compared its logits"], result.stdout  # fmt: skip
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= files
    assert "adapter_config.json" not in files  # merged: a plain model
    assert torch.allclose(_logits_in_fresh_process(tmp_path / "m"), _peft_logits(lora_run), atol=1e-4)
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] and generation["pad_token_id"] is not None


@pytest.mark.slow
def test_sharded_safetensors_with_an_index(tmp_path, lora_run):
    result = cli("export", str(lora_run), "--out", str(tmp_path / "m"), "--max-shard-size", "100KB")
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.allclose(_logits_in_fresh_process(tmp_path / "m"), _peft_logits(lora_run), atol=1e-4)


@pytest.mark.slow
def test_adapter_only_loads_on_the_base_model(tmp_path, lora_run):
    result = cli("export", str(lora_run), "--out", str(tmp_path / "a"), "--adapter-only")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "a" / "adapter_config.json").exists()
    logits = _logits_in_fresh_process(tmp_path / "a", adapter_base=lora_run / "base-model")
    assert torch.allclose(logits, _peft_logits(lora_run), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_an_adapter_of_a_bf16_run_is_verified_on_the_base_in_bf16(tmp_path, method):
    # Before, the fresh process loaded the base in fp32 and held the bf16 reference to fp32's
    # tolerance: every adapter export of a bf16 run (a soft prompt always is one) was refused.
    recipe = small_recipe(tmp_path, method=method, steps=4, save_every=4)
    assert cli("run", str(recipe), "--set", "model.dtype=bfloat16").returncode == 0
    args = ["--adapter-only"] if method == "lora" else []
    result = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "a"), *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"max \|logit diff\| \S+ \(tolerance \S+ for\s+bfloat16\)", result.stdout), result.stdout
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == method.upper()


@pytest.mark.slow
def test_full_run_export_and_a_checkpoint(tmp_path):
    assert cli("run", str(small_recipe(tmp_path, method="full", steps=8, save_every=4))).returncode == 0
    run = tmp_path / "run"
    result = cli("export", str(run), "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        trained = AutoModelForCausalLM.from_pretrained(run / "final")(input_ids=IDS).logits
    assert torch.allclose(_logits_in_fresh_process(tmp_path / "m"), trained, atol=1e-5)
    early = cli("export", str(run), "--checkpoint", "step-4", "--out", str(tmp_path / "early"))
    assert early.returncode == 0, early.stderr[-2000:]
    assert (_logits_in_fresh_process(tmp_path / "early") - trained).abs().max() > 1e-3  # an earlier model


@pytest.mark.slow
def test_existing_folder_is_refused_and_a_failed_export_leaves_nothing(tmp_path, lora_run, monkeypatch):
    (tmp_path / "m").mkdir()
    refused = cli("export", str(lora_run), "--out", str(tmp_path / "m"))
    assert refused.returncode == 2 and "--force" in refused.stderr

    import gptj_tune.export as export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(export.ExportRequest(str(lora_run), str(tmp_path / "half")))
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


@pytest.mark.slow
@pytest.mark.parametrize("out, message", [
    ("{run}", "that is the run directory"),
    ("{run}/final", "that is the run's final model"),
    ("{run}/checkpoints/step-6/model", "that is inside the run's checkpoints"),
    ("{run}/base-model", "that is the run's base model"),
    ("{run}/..", "it holds the run directory"),
])  # fmt: skip
def test_an_export_never_replaces_the_run_or_writes_into_its_models(lora_run, out, message):
    # Before, `--out RUN/final --force` replaced the trained adapter with the merged model, after
    # which the run could no longer be exported; `--out RUN/.. --force` deleted the run.
    before = file_contents(lora_run)
    result = cli("export", str(lora_run), "--out", out.format(run=lora_run), "--force")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert file_contents(lora_run) == before


@pytest.mark.slow
def test_an_out_below_a_file_and_a_bad_shard_size_are_one_line_errors(tmp_path, lora_run):
    (tmp_path / "afile").write_text("x")
    below = cli("export", str(lora_run), "--out", str(tmp_path / "afile" / "m"))
    assert below.returncode == 2 and "afile is a file, not a folder" in below.stderr and "Traceback" not in below.stderr
    size = cli("export", str(lora_run), "--out", str(tmp_path / "m"), "--max-shard-size", "1G")
    assert size.returncode == 2 and "--max-shard-size '1G': expected a size like 5GB" in size.stderr
    assert "Traceback" not in size.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.slow
def test_model_card_names_the_data_and_shows_the_eval_table(tmp_path, lora_run):
    evaluated = cli("eval", str(lora_run), "--tasks", "none", "--out", str(lora_run / "eval"), "--force")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert cli("export", str(lora_run), "--out", str(tmp_path / "m")).returncode == 0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "synthetic demo tasks (600 records" in card and "base_model: tiny-gptj" in card
    assert "## Evaluation" in card and "| held-out | loss |" in card
    assert "## Recipe" in card and "kind: lora" in card


@pytest.mark.slow
def test_generate_file_chat_and_argument_errors(tmp_path, lora_run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Reverse the order of the words.\n\nWhat is the last word?\n")
    from_file = cli("generate", str(lora_run), "--file", str(prompts), "--max-new-tokens", "4")
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    assert "> Reverse the order of the words." in from_file.stdout and "> What is the last word?" in from_file.stdout
    assert f"loaded {lora_run}: " in " ".join(from_file.stderr.split()) and "loaded" not in from_file.stdout  # answers alone on stdout
    chat = cli("generate", str(lora_run), "--chat", "--max-new-tokens", "4", input="Write the words in capital letters.\n\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    sampled = [cli("generate", str(lora_run), "--prompt", "x", "--raw", "--temperature", "1.0", "--seed", str(seed),
                   "--max-new-tokens", "12").stdout for seed in (1, 1, 2)]  # fmt: skip
    assert sampled[0] == sampled[1] != sampled[2]  # sampling follows --seed
    both = cli("generate", str(lora_run), "--prompt", "x", "--chat")
    assert both.returncode == 2 and "exactly one of --prompt, --file or --chat" in both.stderr
    alone = cli("generate", str(lora_run), "--prompt", "x", "--system", "Be brief.")
    assert alone.returncode == 2 and "--system is the system prompt of a --chat conversation; add --chat" in alone.stderr
    no_template = cli("generate", str(lora_run), "--chat", "--system", "Be brief.", input="\n")  # trained on instructions
    assert no_template.returncode == 2 and "it has no chat template (not trained on conversations), so there is no system turn" in \
        " ".join(no_template.stderr.split())  # fmt: skip
    tools = tmp_path / "tools.json"
    tools.write_text('[{"name": "get_weather", "parameters": {"type": "object"}}]')
    for args, message in [(["--prompt", "x", "--tools", str(tools)], "--tools is the tools of a --chat conversation; add --chat"),
                          (["--chat", "--tools", str(tmp_path / "none.json")], f"--tools {tmp_path / 'none.json'}: not a readable JSON file"),
                          (["--chat", "--tools", str(prompts)], "not a readable JSON file (Expecting value"),
                          (["--chat", "--tools", str(tools)], "it has no chat template (not trained on conversations), so there is nowhere to offer them")]:  # fmt: skip
        refused = cli("generate", str(lora_run), *args, input="\n")
        assert refused.returncode == 2 and message in " ".join(refused.stderr.split()), (args, refused.stderr)
        assert "Traceback" not in refused.stderr
