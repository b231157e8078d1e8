"""The engine of a run: an Accelerator configured from the recipe (one process, DDP, DeepSpeed ZeRO,
FSDP2), the model and optimizer wrapped for it, its checkpoint states saved and loaded as it holds
them, and the few collectives the training loop needs. No accelerate config file or environment
is needed. (Starting the processes: train/launch.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path

# torch is imported inside the functions, like the rest of what only workers run.
from ..errors import RecipeError
from ..recipe import Recipe

# ---------------------------------------------------------------------------------- accelerator


def make_accelerator(recipe: Recipe):
    """The Accelerator for the recipe's backend. On CPU, collectives run on gloo."""
    import torch

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    d = recipe.distributed
    accum = recipe.train.grad_accum
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != d.world_size:
        raise RecipeError([
            f"the launcher started {launched} processes but the recipe asks for {d.world_size} "
            f"(distributed.num_processes {d.num_processes} x num_machines {d.num_machines}, backend {d.backend}); "
            f"make them agree, e.g. --set distributed.backend=ddp --set distributed.num_processes={launched}"
        ])
    if d.backend == "single":
        return Accelerator(gradient_accumulation_steps=accum, mixed_precision=d.mixed_precision)
    cuda = torch.cuda.is_available()
    # accelerate and DeepSpeed default to NCCL/oneCCL; on CPU only gloo exists, and it must be asked for.
    group = InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=d.timeout_minutes))
    if d.backend in ("ddp", "fsdp"):  # for fsdp the loop applies FSDP2 itself (prepare_model_and_optimizer)
        return Accelerator(
            cpu=not cuda, gradient_accumulation_steps=accum, mixed_precision=d.mixed_precision, kwargs_handlers=[group]
        )
    # Accelerator(cpu=True) would silently switch DeepSpeed off: leave device choice to DeepSpeed.
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe), zero3_init_flag=_zero_stage(recipe) == 3)
    return Accelerator(
        deepspeed_plugin=plugin, gradient_accumulation_steps=accum, mixed_precision=d.mixed_precision, kwargs_handlers=[group]
    )


def deepspeed_config(recipe: Recipe) -> dict:
    """The DeepSpeed JSON: built from the recipe, or the user's file with `auto` values filled in."""
    import torch

    d, t = recipe.distributed, recipe.train
    filled = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * d.world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    precision = {"bf16": {"enabled": d.mixed_precision == "bf16"}, "fp16": {"enabled": d.mixed_precision == "fp16"}}
    if d.zero.config is not None:
        config = _read_user_config(Path(d.zero.config))
        for key, value in filled.items():
            if config.get(key, "auto") == "auto":
                config[key] = value
        for key, value in precision.items():
            section = config.setdefault(key, {})
            if section.get("enabled", "auto") == "auto":
                section["enabled"] = value["enabled"]
        zero = config.setdefault("zero_optimization", {})
        for key, value in list(zero.items()):
            if value == "auto":
                raise RecipeError([f"distributed.deepspeed.config: {d.zero.config}: zero_optimization.{key} is "
                                   f"`auto`, which gptj-tune cannot fill; give a number"])  # fmt: skip
    else:
        zero: dict = {"stage": d.zero.zero_stage}
        if d.zero.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if d.zero.offload_params == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {**filled, **precision, "zero_optimization": zero}
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # final/ must hold the whole model: gather the shards when saving it.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # Our AdamW is plain torch: no DeepSpeed op to compile (their CPU Adam takes minutes to build).
    config["zero_allow_untested_optimizer"] = True
    config["zero_force_ds_cpu_optimizer"] = False
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def _read_user_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError([f"distributed.deepspeed.config: file not found: {path}"]) from None
    except json.JSONDecodeError as e:
        raise RecipeError([f"distributed.deepspeed.config: {path} line {e.lineno}: not valid JSON ({e.msg})"]) from None
    if not isinstance(config, dict):
        raise RecipeError([f"distributed.deepspeed.config: {path} must hold a JSON object"])
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise RecipeError([f"distributed.deepspeed.config: {path} has `{key}`; remove it: the recipe's train "
                               f"section sets the optimizer and schedule"])  # fmt: skip
    return config


def _zero_stage(recipe: Recipe) -> int | None:
    if recipe.distributed.backend != "deepspeed":
        return None
    return int(deepspeed_config(recipe).get("zero_optimization", {}).get("stage", 0))


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(recipe: Recipe) -> bool:
    return _zero_stage(recipe) == 3


# ---------------------------------------------------------------------------------- collectives


def all_sum(values: list[float], accelerator) -> list[float]:
    """Sum a few numbers over every process (one small collective; none with one process)."""
    import torch

    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def wait_for_file(path: Path, poll_s: float = 0.5) -> None:
    """Wait, with no collective and so no timeout, until another process of this machine writes `path`.

    If that process fails instead, the launcher ends this one too.
    """
    while not path.exists():
        time.sleep(poll_s)


# ------------------------------------------------------------------------- model and its states


def prepare_model_and_optimizer(accelerator, recipe: Recipe, model, make_optimizer):
    """Wrap the model for the backend and build its optimizer. FSDP is applied here with torch's
    FSDP2 `fully_shard` (accelerate's FSDP path does not shard on CPU); the rest goes through accelerate."""
    if recipe.distributed.backend != "fsdp":
        prepared = accelerator.prepare(model, make_optimizer(model))
        if is_deepspeed(accelerator) and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()  # every rank has opened every rank's segment
            unlink_deepspeed_shared_memory()
        return prepared
    model = shard_with_fsdp(model.to(accelerator.device), recipe)
    return model, accelerator.prepare(make_optimizer(model))  # after sharding: it holds the shards


def deepspeed_shared_memory_name() -> Path:
    """Where DeepSpeed's CPU all-reduce keeps this rank's buffer (named from the launcher's environment,
    as its C++ side names it)."""
    env = os.environ
    return Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}"
    )


def unlink_deepspeed_shared_memory() -> None:
    """DeepSpeed on CPU, when every rank is on one machine and its launcher says so (LOCAL_SIZE, set
    by `deepspeed`, our hostfile launch), maps a 69 MB shared-memory buffer per rank and never
    unlinks it: each such run would leave 69 MB of RAM per process in /dev/shm until reboot. Once
    all ranks have opened all buffers, the names can go: the mappings live until the processes end,
    and a run killed later leaves nothing behind."""
    with contextlib.suppress(FileNotFoundError):
        deepspeed_shared_memory_name().unlink()


def shard_with_fsdp(model, recipe: Recipe):
    """FSDP2 in place: each transformer block is one shard unit, then the whole model (embeddings, head)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    d, f = recipe.distributed, recipe.distributed.fsdp_settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if f.sharding == "hybrid_shard":
        mesh = init_device_mesh(device, (d.num_machines, d.num_processes), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device, (d.world_size,))
    options: dict = {"mesh": mesh, "reshard_after_forward": f.sharding != "shard_grad_op"}
    if f.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if d.mixed_precision != "no":
        dtype = torch.bfloat16 if d.mixed_precision == "bf16" else torch.float16
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or ()) | {"GPTJBlock", "GPTNeoBlock"}
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def weights_are_sharded(recipe: Recipe) -> bool:
    """True when no single process holds the whole model (a forward needs all of them)."""
    return recipe.distributed.backend == "fsdp" or is_zero3(recipe)


def full_state_dict(accelerator, model, recipe: Recipe) -> dict | None:
    """The whole model's weights gathered on the main process (collective), or None where the
    unwrapped model already holds them."""
    backend = recipe.distributed.backend
    if backend == "deepspeed":
        return accelerator.get_state_dict(model)
    if backend == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def save_engine_state(folder: Path, accelerator, model, optimizer, recipe: Recipe) -> None:
    """A checkpoint's weights and optimizer state, as the backend holds them. Collective: every
    process calls it; each writes its own shards."""
    import torch

    backend, raw_optimizer = recipe.distributed.backend, getattr(optimizer, "optimizer", optimizer)
    if backend == "deepspeed":
        model.save_checkpoint(str(folder / "deepspeed"), tag="state")
    elif backend == "fsdp" and recipe.distributed.fsdp_settings.state_dict_type == "sharded":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, raw_optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "fsdp"))
    elif backend == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(model, raw_optimizer, options=options)
        if accelerator.is_main_process:
            torch.save({"model": model_state, "optimizer": optimizer_state}, folder / "fsdp-full.pt")
    elif accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder / "model")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_engine_state(folder: Path, accelerator, model, optimizer, recipe: Recipe, load_weights) -> None:
    """Inverse of save_engine_state. `load_weights(folder, model)` reads the one-process format."""
    from .checkpoints import load_tensors

    backend, raw_optimizer = recipe.distributed.backend, getattr(optimizer, "optimizer", optimizer)
    if backend == "deepspeed":
        loaded, _ = model.load_checkpoint(str(folder / "deepspeed"), tag="state", load_lr_scheduler_states=False)
        if loaded is None:
            raise OSError(f"no DeepSpeed state under {folder / 'deepspeed'}")
    elif backend == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        if (folder / "fsdp").is_dir():
            model_state, optimizer_state = get_state_dict(model, raw_optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "fsdp"))
            options = None
        else:  # full: every process reads the whole file and keeps its own shard
            payload = load_tensors(folder / "fsdp-full.pt", mmap=True)
            model_state, optimizer_state = payload["model"], payload["optimizer"]
            options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, raw_optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)
    else:
        load_weights(folder, accelerator.unwrap_model(model))
        optimizer.load_state_dict(load_tensors(folder / "optimizer.pt"))
