"""The throughput benchmarks' workload: GPT-J shapes with random init (built once, reusable), Alpaca
records through gptj-tune's own tokenizer path, the held-out loss every engine is scored by, peak
memory, and the model FLOPs a token needs (train_throughput.py's docstring has the formula)."""

from __future__ import annotations

import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # GPT-J shapes keep GPT-J's 50400-row embedding and head; GPT-Neo's have its 50257 rows
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8),  # the 50400-wide head dominates
    "small": dict(n_layer=6, n_embd=512, n_head=8, rotary_dim=32),  # the blocks dominate
    "gptj-6b": dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64),
    # GPT-Neo: global and local (a 256-token window) attention layers in turn, tied head
    "neo-tiny": dict(family="gpt_neo", n_layer=2, n_embd=64, n_head=4, window=256),
    "gpt-neo-2.7b": dict(family="gpt_neo", n_layer=32, n_embd=2560, n_head=20, window=256),
}
GPU_ONLY = ("gptj-6b", "gpt-neo-2.7b")
LORA = dict(r=16, alpha=32, dropout=0.05)
LORA_TARGETS = {"gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
                "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]}  # gptj-tune's defaults
HELD_OUT = 64  # records after the training records, scored the same way for every engine
VOCAB = 50400  # GPT-J's embedding and head rows, in every GPT-J shape


def commit() -> str:
    """The commit measured: COMMIT if set (the device's copy of .git can be older than the tree, so
    gpu_session.sh passes it), else this checkout's short commit, else "unknown"."""
    import os
    import subprocess

    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def family(shape: str) -> str:
    return SHAPES[shape].get("family", "gptj")


def vocab(shape: str) -> int:
    return VOCAB if family(shape) == "gptj" else 50257


def label(shape: str) -> str:
    """`tiny GPT-J`, `gpt-neo-2.7b GPT-Neo`: the shape and its family, for titles."""
    return f"{shape} {'GPT-J' if family(shape) == 'gptj' else 'GPT-Neo'}"


def config_of(shape: str):
    """The transformers config of a shape (random init, dropout off)."""
    from transformers import GPTJConfig, GPTNeoConfig

    s = SHAPES[shape]
    if family(shape) == "gptj":
        return GPTJConfig(vocab_size=VOCAB, n_positions=2048, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                          **{k: v for k, v in s.items() if k != "family"})  # fmt: skip
    return GPTNeoConfig(vocab_size=vocab(shape), max_position_embeddings=2048, hidden_size=s["n_embd"], num_layers=s["n_layer"],
                        num_heads=s["n_head"], attention_types=[[["global", "local"], s["n_layer"] // 2]],
                        window_size=s["window"], attention_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0,
                        bos_token_id=50256, eos_token_id=50256)  # fmt: skip


def model_for(shape: str, folder: Path, console) -> Path:
    """The benchmark's random-init model of `shape` in `folder`: built there once, reused after
    (`--model-dir`: the GPT-J-6B shape is 12 GB and takes minutes to build). A folder holding
    another shape, or something else, is refused."""
    marker = folder / "benchmark-shape.json"
    if marker.is_file():
        built = json.loads(marker.read_text()).get("shape")
        if built != shape:
            raise SystemExit(f"--model-dir {folder} holds the {built} shape, not {shape}: choose another folder or delete it")
        console.print(f"reusing the {shape} model in {folder}")
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"--model-dir {folder} is not empty and holds no benchmark model: choose an empty or new folder")
    console.print(f"building the {shape} model in {folder} ...")
    build_model(shape, folder)
    marker.write_text(json.dumps({"shape": shape, "config": SHAPES[shape]}))  # last: a half-built folder has none
    return folder


def build_model(shape: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if shape in GPU_ONLY:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config_of(shape)).to(torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_config(config_of(shape))
    model.save_pretrained(folder)


def tokenize(spec: dict, first: int, count: int):
    """Alpaca records [first, first+count) through gptj-tune's own tokenizer path (prompt masked)."""
    from transformers import AutoTokenizer

    from gptj_tune.data.formats import read_source
    from gptj_tune.data.templates import BUILTIN_TEMPLATES
    from gptj_tune.data.tokens import tokenize_instructions
    from gptj_tune.recipe import SourceSection

    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    tok.eos_token = tok.eos_token or "<|endoftext|>"  # GPT-2's files name none
    tok.pad_token = tok.eos_token
    source = SourceSection(format="alpaca", path=spec["alpaca"], limit=first + count)
    records = read_source(source, 0, "skip").records[first:]
    examples, _ = tokenize_instructions(records, tok, BUILTIN_TEMPLATES["alpaca"], spec["max_length"], False, "truncate")
    return tok, examples


def held_out_loss(model, spec: dict, device) -> float:
    """Mean target-token cross-entropy on the held-out records; plain padded batches, eager math. A
    4-bit base is scored in the layout it trained in, for every engine (bitsandbytes would re-pack
    it for its CPU inference kernel, with bf16 scales, on CPUs with AVX-512 bf16: model/quantize.py)."""
    import torch
    import torch.nn.functional as F

    from gptj_tune.model.quantize import one_layout_for_training_and_inference

    tok, examples = tokenize(spec, spec["records"], HELD_OUT)
    one_layout_for_training_and_inference(model)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            chunk = examples[i : i + 8]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e.input_ids)) for e in chunk], device=device)
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk], device=device)
            mask = (torch.arange(width, device=device)[None] < torch.tensor([len(e.input_ids) for e in chunk], device=device)[:, None]).long()
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def peak_memory(device: str) -> float:
    """GiB: CUDA max allocated, or this process's peak RSS (VmHWM)."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _matching_rows(spec: dict, examples) -> int:
    mean = sum(len(e.input_ids) for e in examples) / len(examples)
    return max(1, math.floor(spec["batch_size"] * mean / spec["max_length"]))


# Each LoRA target's input and output widths, in units of d_model.
ADAPTER_WIDTHS = {"q_proj": (1, 1), "k_proj": (1, 1), "v_proj": (1, 1), "out_proj": (1, 1),
                  "fc_in": (1, 4), "fc_out": (4, 1), "c_fc": (1, 4), "c_proj": (4, 1)}  # fmt: skip


def matmul_params(shape: str, method: str, r: int | None = None, targets: list[str] | None = None) -> dict[str, int]:
    """Weights that multiply tokens: the blocks' (q, k, v, out: d x d; fc_in, fc_out: d x 4d), the
    head's (vocab x d) and, for LoRA, the adapters' (rank r x (in + out) on each target; by default
    the benchmark's rank on gptj-tune's default targets)."""
    d, layers = SHAPES[shape]["n_embd"], SHAPES[shape]["n_layer"]
    adapters = 0
    if method in ("lora", "qlora"):
        r, targets = r or LORA["r"], targets or LORA_TARGETS[family(shape)]
        adapters = r * layers * sum(sum(ADAPTER_WIDTHS[t]) * d for t in targets)
    return {"blocks": 12 * d * d * layers, "head": vocab(shape) * d, "adapters": adapters}


def token_stats(examples, window: int | None = None) -> dict[str, float]:
    """Over the workload's real tokens: the share whose next token the loss scores, and the mean
    causal span (keys a token attends to: its position in its example, plus one); with `window`
    (GPT-Neo's local layers), also the mean span within that window."""
    real = sum(len(e.input_ids) for e in examples)
    scored = sum(sum(1 for label in e.labels[1:] if label != -100) for e in examples)
    spans = sum(len(e.input_ids) * (len(e.input_ids) + 1) // 2 for e in examples)
    stats = {"scored_share": scored / real, "mean_span": spans / real}
    if window:
        local = sum(sum(min(i + 1, window) for i in range(len(e.input_ids))) for e in examples)
        stats["mean_local_span"] = local / real
    return stats


def flops_per_token(spec: dict, stats: dict[str, float]) -> tuple[float, str]:
    """Model FLOPs per real training token, and the formula with its numbers (module docstring);
    `spec` may name the adapters' rank and targets (`lora_r`, `lora_targets`)."""
    shape = SHAPES[spec["shape"]]
    n = matmul_params(spec["shape"], spec["method"], spec.get("lora_r"), spec.get("lora_targets"))
    k = 6 if spec["method"] == "full" else 4
    if "window" in shape:  # GPT-Neo: half the layers attend within the window
        local = shape["n_layer"] // 2
        attention = 12 * shape["n_embd"] * ((shape["n_layer"] - local) * stats["mean_span"] + local * stats["mean_local_span"])
        spans = (f" + 12*d_model*({shape['n_layer'] - local}*{stats['mean_span']:.1f} (global layers' mean causal span) + "
                 f"{local}*{stats['mean_local_span']:.1f} (local layers'))")  # fmt: skip
    else:
        attention = 12 * shape["n_layer"] * shape["n_embd"] * stats["mean_span"]
        spans = f" + 12*layers*d_model*{stats['mean_span']:.1f} (mean causal span)"
    total = k * n["blocks"] + k * n["head"] * stats["scored_share"] + 6 * n["adapters"] + attention
    formula = (
        f"{k}*N_blocks + {k}*N_head*{stats['scored_share']:.3f} (scored share)"
        + (" + 6*N_lora" if n["adapters"] else "")
        + f"{spans} = {total / 1e9:.3g} GFLOP per token; "
        f"N_blocks {n['blocks']:,}, N_head {n['head']:,}" + (f", N_lora {n['adapters']:,}" if n["adapters"] else "")
    )
    return total, formula


# Two-line headers of fixed width, no outer edge: the whole table, MFU column included, fits an
# 80-column terminal (rich otherwise cuts headers and cells to "…" to fit).
