"""Checkpoints: written atomically by every process together (each its RNG state, and its shards
under ZeRO/FSDP), and read back so that a resumed run continues the same loss curve."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import RunDirError, typed_first_line
from ..manifest import sync_folder, sync_tree, write_manifest
from ..model.prompt_tuning import SoftPromptModel
from ..recipe import Recipe
from ..rundir import RunDir
from .disk import DiskNeeds
from .engines import load_engine_state, save_engine_state


def save_checkpoint(recipe: Recipe, run: RunDir, step: int, accelerator, model, optimizer, scheduler, state: dict,
                    disk: DiskNeeds) -> Path:  # fmt: skip
    """Write checkpoints/step-N atomically. Every process writes its part (its RNG state; its ZeRO
    shards under DeepSpeed) into one temp folder; the main process adds the manifest (written last)
    and renames the folder when all are done. The free space is checked first (main process, unless
    train.check_disk is off), and the size of what was saved replaces `disk`'s estimate. A save that fails leaves no
    temp folder; one that fails for space is a DiskFullError."""
    import shutil

    main, rank = accelerator.is_main_process, accelerator.process_index
    target = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f".partial-step-{step}"
    kept = run.list_checkpoints()
    then = f"continue from {kept[-1][1].name} with: {run.resume_command()}" if kept else "start the run again (--force)"
    with disk.saving(run.path, f"checkpoint step-{step}", disk.checkpoint, then, check=main):
        try:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            save_engine_state(tmp, accelerator, model, optimizer, recipe)
            torch.save(rng_states(), tmp / f"rng-{rank}.pt")
            if main:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "trainer_state.json").write_text(json.dumps({**state, "world_size": accelerator.num_processes}, indent=2))
            accelerator.wait_for_everyone()
            if main:
                disk.checkpoint = write_manifest(tmp)  # what one checkpoint takes, from now on
                sync_tree(tmp)  # whole on the disk before it has its name
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if main:
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        sync_folder(run.checkpoints)  # the rename is on the disk before older checkpoints go
        run.prune_checkpoints(recipe.train.keep_last)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(recipe: Recipe, folder: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from `folder`; return its trainer state."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if state.get("world_size", 1) != accelerator.num_processes:
            raise RunDirError(
                f"{folder} was saved by {state.get('world_size', 1)} process(es); this run has "
                f"{accelerator.num_processes}. Resume with the same distributed layout."
            )
        load_engine_state(folder, accelerator, model, optimizer, recipe, _load_weights)
        scheduler.load_state_dict(load_tensors(folder / "scheduler.pt"))
        rng = read_rng_states(folder / f"rng-{accelerator.process_index}.pt")
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise RunDirError(f"{folder}: checkpoint cannot be loaded ({typed_first_line(e)})") from None
    set_rng_states(rng)
    return {k: v for k, v in state.items() if k != "world_size"}


def rng_states() -> dict:
    """This process's random states (python, numpy, torch, CUDA) as tensors, ints and strings only,
    so that `read_rng_states` loads them with `weights_only=True`: nothing in a checkpoint is
    unpickled as an object, and a planted payload cannot run on --resume."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def read_rng_states(path: Path) -> dict:
    """What `rng_states` saved (see `load_tensors`)."""
    return load_tensors(path)


def load_tensors(path: Path, **options):
    """torch.load with weights_only=True: tensors, numbers, strings and containers of them. A file
    holding anything else (an older checkpoint's pickled RNG state, or a payload) is refused unread."""
    try:
        return torch.load(path, weights_only=True, **options)
    except pickle.UnpicklingError:
        raise RunDirError(f"{path} holds pickled Python objects, which gptj-tune does not load (unpickling a file can run "
                          f"code); a checkpoint written before this version cannot be resumed: start the run again") from None  # fmt: skip


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _load_weights(folder: Path, model) -> None:
    """Weights of a one-process checkpoint (folder/model: adapter or full safetensors) into `model`."""
    from safetensors.torch import load_file

    weights = folder / "model"
    if isinstance(model, SoftPromptModel):
        model.load_saved(weights)
        return
    if (weights / "adapter_model.safetensors").exists():
        import peft

        peft.set_peft_model_state_dict(model, load_file(weights / "adapter_model.safetensors"))
        return
    state = {}
    for file in sorted(weights.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RunDirError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
