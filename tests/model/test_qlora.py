"""QLoRA (`method.kind: qlora`) and 8-bit optimizer states: the 4-bit base (bitsandbytes, run for real on the CPU), training,
resume, eval and export on the tiny model, the plan's figures, and the recipes it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, small_recipe

from gptj_tune.plan import GIB, plan
from gptj_tune.recipe import load_recipe


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_is_within_the_formats_bound(double_quant):
    """A weight comes back from NF4 within half the widest gap between neighbouring NF4 levels
    (0.7230 to 1.0, QLoRA's table) times its block's absmax; with double quantization the absmax
    itself is held in 8 bits (a dynamic map), a few % more. And the 4-bit copy packs two weights a byte."""
    from bitsandbytes.functional import dequantize_4bit, get_4bit_type, quantize_4bit

    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    packed, state = quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    back = dequantize_4bit(packed, state, quant_type="nf4").float()
    levels = get_4bit_type("nf4", device="cpu").float().sort().values
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    absmax = weight.reshape(-1, 64).abs().amax(1, keepdim=True)
    error = (back - weight).reshape(-1, 64).abs()
    bound = absmax * (half_gap * (1.05 if double_quant else 1.0)) + 1e-7
    assert (error <= bound).all(), float((error / bound).max())
    assert error.mean() > 0 and packed.numel() == weight.numel() // 2 and packed.dtype == torch.uint8


def test_plan_puts_6b_qlora_at_2048_tokens_on_a_16_gb_card(tmp_path):
    """GPT-J-6B QLoRA r16, one 2048-token row, gradient checkpointing: under 12 GiB (a 16 GB card),
    against ~26 GiB measured for bf16 LoRA on an H200; only single/ddp are offered (nothing to shard)."""
    recipe = load_recipe("recipes/alpaca-qlora.yaml", ["data.max_length=2048", "train.batch_size=1",
                                                      f"output.dir={tmp_path}"])  # fmt: skip
    ours = plan(recipe, devices=1, device_gib=16)
    single = next(e for e in ours.estimates if e.setup == "single")
    assert 3 * GIB < single.total < 12 * GIB and ours.refusal() is None, single.total / GIB
    assert {e.setup for e in ours.estimates} == {"single"}
    lora = plan(load_recipe("recipes/alpaca-lora.yaml", ["data.max_length=2048", "train.batch_size=1",
                                                         f"output.dir={tmp_path}"]), devices=1)  # fmt: skip
    assert next(e for e in lora.estimates if e.setup == "single").states > 2.5 * single.states


def test_an_evaluation_between_steps_leaves_the_4bit_base_as_it_trains(tmp_path):
    """A run evaluates between training steps. On a CPU with AVX-512 bf16 bitsandbytes re-packs a
    4-bit weight for its inference kernel at the first forward in eval mode and keeps it so: the next
    training step then failed inside bitsandbytes, and saving would have rounded the weight's scales
    through bf16. The trained model holds every 4-bit layer in one layout (on any CPU), and an
    evaluation in between changes neither the weights nor the next step's loss and gradients."""
    from bitsandbytes.nn import Linear4bit

    from gptj_tune.model.load import resolve_base
    from gptj_tune.train.setup import model_to_train

    recipe = load_recipe(small_recipe(tmp_path, method="qlora"), [])
    model, tokenizer = model_to_train(recipe, resolve_base(recipe.model, tmp_path), torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 12 and not any(m.support_avx512bf16_for_cpu for m in layers)
    weights = [(m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in layers]
    ids = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))

    def train_step():
        model.train()
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss, grads = train_step()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    again, grads_again = train_step()
    assert again == loss and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    assert all(torch.equal(m.weight.data, w) and torch.equal(m.weight.quant_state.absmax, a) for m, (w, a) in zip(layers, weights))


@pytest.mark.parametrize(
    "override,message",
    [
        (["method.kind=full", "method.quant_type=nf4"], "method.quant_type"),
        (["method.kind=prompt_tuning", "method.double_quant=true"], "method.double_quant"),
        (["method.kind=qlora", "method.quant_type=int8"], "method.quant_type"),
        (["method.kind=qlora", "distributed.backend=deepspeed", "distributed.num_processes=2"],
         "method.kind qlora holds the base in 4 bits, which deepspeed cannot shard"),
        (["method.kind=qlora", "train.compile=true"], "train.compile: true does not take a 4-bit base"),
    ],
)
def test_recipes_qlora_cannot_serve_are_one_line_errors(tmp_path, override, message):
    recipe = small_recipe(tmp_path)
    args = [a for o in override for a in ("--set", o)]
    result = cli("validate", str(recipe), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr


@pytest.mark.slow
def test_qlora_learns_like_lora_resumes_the_same_curve_evaluates_and_exports(tmp_path):
    """On the tiny model (fp32 products on this CPU, NF4 base): the loss falls within 10% as far as
    LoRA's on the unquantized base; a run resumed from step 10 logs the same curve; eval loads the
    base in 4 bits (its held-out loss is the run's); a merged export holds unquantized weights that
    plain transformers loads, within the stated tolerance of the 4-bit model as trained; an
    adapter-only export says how to quantize its base."""
    import shutil

    runs = {}
    for kind in ("lora", "qlora"):
        recipe = small_recipe(tmp_path, method=kind, steps=20, save_every=10, out=tmp_path / kind, name=f"{kind}.yaml",
                              method_extra="dropout: 0.1")  # fmt: skip
        result = cli("run", str(recipe), "--set", "eval.every_steps=10")  # an evaluation between steps
        assert result.returncode == 0, result.stderr[-3000:]
        runs[kind] = (recipe, losses(tmp_path / kind), result.stdout)
    (_, lora, _), (recipe, qlora, out) = runs["lora"], runs["qlora"]
    drop = lambda c: sum(c[s] for s in range(1, 4)) / 3 - sum(c[s] for s in range(18, 21)) / 3  # noqa: E731
    assert drop(lora) > 0.5 and drop(qlora) > 0.9 * drop(lora), (drop(lora), drop(qlora))
    assert lora != qlora  # the base differs: the curves cannot be the same
    assert "qlora on tiny-gptj" in out.replace("\n", " ")
    # resume from step 10 of a copy: the same curve
    run, copy = tmp_path / "qlora", tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-20")
    shutil.rmtree(copy / "final")
    resumed = cli("run", str(recipe), "--resume", "step-10", "--set", f"output.dir={copy}", "--set", "eval.every_steps=10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = losses(copy)
    assert max(abs(qlora[s] - again[s]) for s in range(11, 21)) < 1e-5
    # eval: the held-out loss of the 4-bit model as trained (an unquantized base would score differently)
    summary = json.loads((run / "summary.json").read_text())
    evaluated = cli("eval", str(run), "--tasks", "none", "--out", str(tmp_path / "report"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    held_out = json.loads((tmp_path / "report" / "report.json").read_text())["held_out"]["loss"]
    assert abs(held_out - summary["eval_loss"]) < 1e-4, (held_out, summary["eval_loss"])
    # merged export: unquantized weights, loaded by plain transformers, verified against the 4-bit model
    exported = cli("export", str(run), "--out", str(tmp_path / "merged"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "verified" in exported.stdout and "tolerance" in exported.stdout
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # adapter only: says how its base was quantized, and generate/eval load it that way
    adapter = cli("export", str(run), "--out", str(tmp_path / "adapter"), "--adapter-only")
    assert adapter.returncode == 0, adapter.stderr[-3000:]
    about = json.loads((tmp_path / "adapter" / "gptj-tune.json").read_text())
    assert about["method"] == "qlora" and about["quantized"] == {"quant_type": "nf4", "double_quant": True, "dtype": "float32"}
    assert "max |logit diff| 0 " in adapter.stdout.replace("\n", " ")  # the same 4-bit model, reloaded


def test_plan_counts_8bit_optimizer_states_for_6b_full_fine_tuning(tmp_path):
    """bf16 weights, gradients and Kahan compensation with 8-bit moments: ~8 bytes a parameter
    (10 with 16-bit moments), so GPT-J-6B full fine-tuning at 1 x 2048 plans under 48 GiB."""
    args = ["data.max_length=2048", "train.batch_size=1", f"output.dir={tmp_path}"]
    eight = plan(load_recipe("recipes/alpaca-full.yaml", args + ["train.optimizer=adamw_8bit"]), devices=1, device_gib=48)
    sixteen = plan(load_recipe("recipes/alpaca-full.yaml", args), devices=1, device_gib=48)
    single = next(e for e in eight.estimates if e.setup == "single")
    assert 7.9 < single.states / eight.shape.params < 8.2 and single.total < 48 * GIB and eight.refusal() is None
    assert next(e for e in sixteen.estimates if e.setup == "single").states / sixteen.shape.params > 9.9
    assert "train.optimizer adamw_8bit runs on single and ddp" in _validate_error(tmp_path, ["train.optimizer=adamw_8bit",
        "distributed.backend=fsdp", "distributed.num_processes=2"])  # fmt: skip
    assert "train.optimizer" in _validate_error(tmp_path, ["train.optimizer=adam8"])


def _validate_error(tmp_path, overrides: list[str]) -> str:
    result = cli("validate", str(small_recipe(tmp_path)), *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr
