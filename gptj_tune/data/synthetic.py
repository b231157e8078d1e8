"""The embedded demo data: instruction tasks our code generates, each with one right answer.

Used by the quickstart recipe and the built-in tiny model, so learning is measurable by exact
match with no download. Every (task, input) pair is generated at most once, so a held-out split
holds prompts the model has never seen.
"""

from __future__ import annotations

import random

WORDS = (
    "apple bird cake door echo fish goat hill iron jam kite lamp moon nest oak pear queen rain "
    "ship tree unit vase wolf yard zinc bell coin drum farm gold hat ink jar king leaf milk net "
    "owl pen ring salt tent"
).split()

TASKS = ("reverse", "sort", "upper", "count", "last")

INSTRUCTIONS = {
    "reverse": "Reverse the order of the words.",
    "sort": "Sort the numbers from smallest to largest.",
    "upper": "Write the words in capital letters.",
    "count": "How many words are there?",
    "last": "What is the last word?",
}


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _make(task: str, rng: random.Random) -> tuple[str, str]:
    """Return (input, output) for one example of `task`."""
    if task == "reverse":
        words = _words(rng, 2, 3)
        return " ".join(words), " ".join(reversed(words))
    if task == "sort":
        numbers = rng.sample(range(20), 3)
        return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))
    if task == "upper":
        words = _words(rng, 1, 3)
        return " ".join(words), " ".join(words).upper()
    if task == "count":
        words = _words(rng, 1, 7)
        return " ".join(words), str(len(words))
    if task == "last":
        words = _words(rng, 2, 6)
        return " ".join(words), words[-1]
    raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")


def generate_records(count: int, tasks: list[str] | tuple[str, ...] = TASKS, seed: int = 0) -> list[dict]:
    """Generate `count` unique alpaca-style records (instruction, input, output), tasks interleaved.

    Deterministic for a given (count, tasks, seed).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; choose from {', '.join(TASKS)}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < count:
        task = tasks[len(records) % len(tasks)]
        text_in, text_out = _make(task, rng)
        attempts += 1
        if attempts > count * 50:
            raise ValueError(f"could not generate {count} unique records for tasks {list(tasks)}")
        if (task, text_in) in seen:
            continue
        seen.add((task, text_in))
        records.append({"instruction": INSTRUCTIONS[task], "input": text_in, "output": text_out, "task": task})
    return records


def as_conversations(records: list[dict]) -> list[dict]:
    """The tasks as short dialogues (the chat demo): two records a conversation, each a user turn
    (instruction and input) and the assistant's answer; every fourth one opens with a system turn."""
    out = []
    for n in range(0, len(records) - 1, 2):
        messages = [{"role": "system", "content": "You answer in as few words as the task needs."}] if n % 8 == 0 else []
        for r in records[n : n + 2]:
            messages += [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                         {"role": "assistant", "content": r["output"]}]  # fmt: skip
        out.append({"messages": messages})
    return out
