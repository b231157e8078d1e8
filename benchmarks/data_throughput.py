"""Benchmark (not a test): preparing data, cold (tokenize, split, pack into the token store) and
warm (the store read back from the cache), for text corpora, Alpaca 52k and conversations.

    python benchmarks/data_throughput.py [--cases novels-47mb,novels-470mb,novels-1gb,alpaca-52k,chat-13k,chat-13k-chatml]
        [--workers 1,auto] [--compare-with /path/to/older/checkout] [--out data_throughput.json]

Corpora: the four novels under ../shared/data/domain copied 25, 250 or 530 times (47 MB, 470 MB,
1 GB) into a temp folder; Alpaca 52k is ../shared/data/alpaca/alpaca_data.json; chat-13k is the same
52k records as 13,001 conversations (a system turn, then four user/assistant pairs) in a JSONL file,
read with `format: chat` and the `gptj-chat` template (rendered by its Python copy); chat-13k-chatml
is the same file with a recipe's own template (ChatML's markers as text), which Jinja renders, in
worker processes with `data.workers` above 1. GPT-2's tokenizer, the
recipe defaults of `novel-domain` at max_length 512. Each measurement runs in a process of its own,
so its peak RSS (ru_maxrss) is its own. `--compare-with` runs the same cold preparation with the
`gptj_tune` of another checkout (e.g. a worktree of an older commit, whose `prepare_data` kept
tokens in Python lists) in the same run, for ratios on the same machine; `--workers` measures our cold
preparation with each `data.workers` given (the last one also warm), the workers' peak RSS beside
the main process's (`--compare-cases`; not on
the 470 MB corpus by default, which the list-based code cannot hold in 24 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = {"novels-47mb": 25, "novels-470mb": 250, "novels-1gb": 530, "alpaca-52k": None, "chat-13k": "chat",
         "chat-13k-chatml": "chat"}
# chat-13k-chatml: the same conversations with a recipe's own template (ChatML's markers as text): Jinja renders them
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def shared_data() -> Path:
    for c in (os.environ.get("GPTJ_TUNE_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if c and (Path(c) / "README.md").exists():
            return Path(c)
    sys.exit("benchmark data not found: set GPTJ_TUNE_SHARED_DATA to the shared data folder")


def corpus(case: str, scratch: Path, data: Path) -> tuple[dict, int]:
    """The data section's source for a case, and the bytes it reads."""
    copies = CASES[case]
    if copies == "chat":
        path = scratch / "conversations.jsonl"
        records = json.loads((data / "alpaca" / "alpaca_data.json").read_text())
        with open(path, "w") as out:
            for i in range(0, len(records), 4):
                turns = [{"role": "system", "content": "You are a helpful assistant."}]
                for r in records[i : i + 4]:
                    turns += [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
                              {"role": "assistant", "content": r["output"]}]  # fmt: skip
                out.write(json.dumps({"messages": turns}) + "\n")
        own = {"chat_template": CHATML} if case.endswith("-chatml") else {}
        return {"format": "chat", "path": str(path), **own}, path.stat().st_size
    if copies is None:
        path = data / "alpaca" / "alpaca_data.json"
        return {"format": "alpaca", "path": str(path)}, path.stat().st_size
    folder = scratch / case
    if not folder.exists():
        folder.mkdir(parents=True)
        for i in range(copies):
            for novel in sorted((data / "domain").glob("*.txt")):
                shutil.copyfile(novel, folder / f"copy{i:03d}-{novel.name}")
    return {"format": "text", "path": str(folder)}, sum(p.stat().st_size for p in folder.iterdir())


WORKER = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
from transformers import AutoTokenizer
from gptj_tune.recipe import DataSection
from gptj_tune.data import prepare_data
tok = AutoTokenizer.from_pretrained(args["tokenizer"])
tok.eos_token = "<|endoftext|>"; tok.pad_token = tok.eos_token
extra = {"cache_dir": args["cache"]} if "cache_dir" in DataSection.model_fields else {}
if args.get("chat_template"):
    extra["chat_template"] = args["chat_template"]
if args.get("workers") and "workers" in DataSection.model_fields:
    extra["workers"] = args["workers"] if args["workers"] == "auto" else int(args["workers"])
section = DataSection(sources=[args["source"]], max_length=512, eval_fraction=0.02, eval_max=100, on_bad_record="skip", **extra)
start = time.perf_counter()
data = prepare_data(section, tok)
rows = len(data.train_rows)
seconds = time.perf_counter() - start
tokens = data.train_stats.tokens + data.eval_stats.tokens
if not data.eval_records and "cache_dir" not in DataSection.model_fields:
    tokens = data.train_stats.tokens  # the list-based code counted every text block as train
print(json.dumps({"seconds": seconds, "tokens": tokens, "rows": rows,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measure(source: dict, cache: Path, pythonpath: Path, data: Path, workers: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    source = dict(source)  # (the case's template is the data section's, not the source's)
    args = {"chat_template": source.pop("chat_template", None), "source": source, "cache": str(cache),
            "tokenizer": str(data / "gpt2-tokenizer"), "workers": workers}
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], env=env, capture_output=True, text=True, cwd=cache.parent)
    if out.returncode != 0:
        sys.exit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="novels-47mb,novels-470mb,novels-1gb,alpaca-52k,chat-13k,chat-13k-chatml")
    parser.add_argument("--compare-with", type=Path, help="a checkout whose gptj_tune is measured cold beside ours")
    parser.add_argument("--compare-cases", default="novels-47mb,alpaca-52k,chat-13k,chat-13k-chatml",
                        help="cases the other checkout runs (its list-based code needs ~26 GB, 200 bytes a token, for 470 MB of text)")
    parser.add_argument("--workers", default="auto",
                        help="data.workers for our cold runs; several, comma-separated (e.g. 1,auto), measure each")
    parser.add_argument("--out", type=Path, default=Path("data_throughput.json"))
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in CASES]:
        sys.exit(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    from rich.console import Console
    from rich.table import Table

    from gptj_tune.rundir import atomic_write_text

    console, data, results = Console(width=150), shared_data(), []
    with tempfile.TemporaryDirectory(prefix="gptj-tune-data-bench-") as tmp:
        scratch = Path(tmp)
        for case in cases:
            source, size = corpus(case, scratch, data)
            counts = [w.strip() for w in args.workers.split(",") if w.strip()]
            runs = [(f"gptj-tune workers={w}" if len(counts) > 1 else "gptj-tune", "cold", REPO, w) for w in counts]
            runs.append((runs[-1][0], "warm", REPO, counts[-1]))
            if args.compare_with and case in args.compare_cases.split(","):
                runs.append((f"compare: {args.compare_with.name}", "cold", args.compare_with, None))
            for engine, cache_state, code, workers in runs:
                cache = scratch / f"cache-{case}"
                if cache_state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                console.print(f"{case}: {engine} {cache_state} ...")
                m = measure(source, cache, code, data, workers)
                results.append({"case": case, "engine": engine, "cache": cache_state, "input_bytes": size, **m,
                                "mb_per_s": size / 1e6 / m["seconds"], "tokens_per_s": m["tokens"] / m["seconds"],
                                "rss_bytes_per_token": m["peak_rss"] / max(1, m["tokens"])})  # fmt: skip
            shutil.rmtree(scratch / case, ignore_errors=True)
            (scratch / "conversations.jsonl").unlink(missing_ok=True)
    table = Table("case", "engine", "cache", "seconds", "MB/s", "tokens/s", "tokens", "peak RSS GB", "worker GB", "RSS bytes/token",
                  title="data preparation (GPT-2 tokenizer, max_length 512)")  # fmt: skip
    for r in results:
        table.add_row(r["case"], r["engine"], r["cache"], f"{r['seconds']:.2f}", f"{r['mb_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens']:,}", f"{r['peak_rss'] / 1e9:.2f}",
                      f"{r.get('worker_peak_rss', 0) / 1e9:.2f}", f"{r['rss_bytes_per_token']:.1f}")  # fmt: skip
    console.print(table)
    for case in cases:
        ours = [r for r in results if r["case"] == case and r["engine"].startswith("gptj-tune") and r["cache"] == "cold"][-1]
        for other in (r for r in results if r["case"] == case and r["engine"].startswith("gptj-tune workers=")
                      and r["cache"] == "cold" and r is not ours):  # fmt: skip
            console.print(f"{case}: {ours['engine']} {other['seconds'] / ours['seconds']:.2f}x faster than {other['engine']}")
        for other in (r for r in results if r["case"] == case and r["engine"].startswith("compare")):
            console.print(f"{case}: cold preparation {other['seconds'] / ours['seconds']:.1f}x faster than {other['engine']}, "
                          f"peak RSS {other['peak_rss'] / ours['peak_rss']:.1f}x lower")  # fmt: skip
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    atomic_write_text(args.out, json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
