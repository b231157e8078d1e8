"""Conversations to token ids and targets in bulk, for the token store: rendered with the chat
template, then tokenized many at a time (data/chat.py says what the ids and targets are, one
conversation at a time).

Rendering is the slow part of a chat build (Jinja in Python,
2k + 1 renders for a conversation of k learned replies, about 0.8 ms for four exchanges on one
core), spread over worker processes once a build has shown it is large enough to pay for them.

A conversation the template cannot render (its own `raise_exception`, e.g. roles that do not
alternate, or any error inside the template) comes back as the reason, a string, so the build can
name the record and fail or skip it (`data.on_bad_record`) instead of stopping on a Jinja traceback.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .chat import ChatTemplateError, assistant_spans, ids_and_targets
from .encode import checked_count
from .render_workers import RenderWorker, WorkerGone

Rendered = tuple[str, list[tuple[int, int]]] | str  # (text, assistant spans), or why it could not be rendered

START_AFTER = 1024  # conversations rendered here before workers start: ~0.9 s, about a worker's start-up (1.2 s)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, a batch scheduler's cgroup)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def data_workers(setting: int | str) -> int:
    """`data.workers` as a number: `auto` is every core this process may use."""
    return available_cores() if setting == "auto" else int(setting)


def render_one(tokenizer, template: str, messages: list[dict]) -> Rendered:
    """What assistant_spans gives, or why the template's code failed on this conversation (a
    template whose turns cannot be found at all raises: no conversation would render)."""
    try:
        return assistant_spans(tokenizer, template, messages)
    except ChatTemplateError as e:
        return f"data.chat_template could not render this conversation: {e.reason}"


class Renderer:
    """`render_one` over lists of conversations, in order. With `workers` > 1, once START_AFTER
    conversations have been rendered here, `workers - 1` worker processes start (data/
    render_workers.py) and, once up, render all but one share of each list while this process
    renders that share. A worker that ends (killed, out of memory) ends the others, and the build
    goes on here; `close` ends them."""

    def __init__(self, tokenizer, template: str, workers: int, start_after: int = START_AFTER):
        self.tokenizer, self.template = tokenizer, template
        self.workers, self.start_after = workers, start_after
        self.seen = 0
        self.in_workers = 0  # conversations the workers rendered (for tests and the benchmark)
        self.lost = ""  # why the workers were given up, if they were
        self._pool: list[RenderWorker] = []

    def __call__(self, conversations: list[list[dict]]) -> list[Rendered]:
        self.seen += len(conversations)
        if self.seen > self.start_after:
            self.start()
        if not self._ready() or len(conversations) < 2:
            return self._here(conversations)
        share = -(-len(conversations) // self.workers)  # an equal share each, this process included
        parts = [conversations[i : i + share] for i in range(share, len(conversations), share)]
        try:
            for worker, part in zip(self._pool, parts):
                worker.send(part)
            out = self._here(conversations[:share])
            for worker, _ in zip(self._pool, parts):
                out += worker.receive()
        except WorkerGone as e:  # render the lot here, and the rest of the build
            self._give_up(str(e))
            return self._here(conversations)
        self.in_workers += len(conversations) - share
        return out

    def start(self, wait: bool = False) -> None:
        """Start the workers in the background (`wait`: until each has loaded the tokenizer)."""
        if not self._pool and self.workers > 1 and not self.lost and os.name == "posix":
            self._pool = [RenderWorker(self.tokenizer, self.template) for _ in range(self.workers - 1)]
        while wait and self._pool and not self._ready():
            time.sleep(0.05)

    def close(self) -> None:
        pool, self._pool = self._pool, []
        for worker in pool:
            worker.close()

    def _ready(self) -> bool:
        try:
            return bool(self._pool) and all([w.poll_ready() for w in self._pool])
        except WorkerGone as e:
            self._give_up(str(e))
            return False

    def _give_up(self, why: str) -> None:
        self.lost = why
        self.close()

    def _here(self, conversations: list[list[dict]]) -> list[Rendered]:
        return [render_one(self.tokenizer, self.template, m) for m in conversations]


class ChatEncoder:
    """Conversations to (ids, targets) as `chat_ids` gives them, many at a time and faster: rendered
    by `render` (a Renderer), the texts go through the build's encoder together (tiktoken for
    GPT-2's BPE), and a token is a target when its first byte lies in an assistant span, its byte
    offset summed from the tokens' byte lengths instead of read from the tokenizer's offset mapping
    (which tokenizes one text at a time, in one thread: half the time of a chat build before).
    Without byte lengths (not a byte-level BPE), or when the first batch differs from the offset
    mapping's ids and targets in any id or target, every conversation goes the offset mapping's way.
    A conversation the template cannot render gives the reason (a string) in its place."""

    def __init__(self, tokenizer, train_on_prompt: bool, encode, byte_lengths, render: Renderer):
        self.tokenizer, self.train_on_prompt, self.render = tokenizer, train_on_prompt, render
        self.encode, self.byte_lengths = encode, byte_lengths
        self.checked = byte_lengths is None

    @property
    def fast(self) -> bool:
        return self.byte_lengths is not None

    def __call__(self, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        out: list = self.render(conversations)
        good = [i for i, r in enumerate(out) if not isinstance(r, str)]
        rendered = [out[i] for i in good]
        for i, encoded in zip(good, self._fast(rendered) if self.fast else map(self._reference, rendered)):
            out[i] = encoded
        return out

    def _fast(self, rendered: list[tuple[str, list]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for (text, spans), ids in zip(rendered, self.encode([text for text, _ in rendered])):
            ids = np.asarray(ids, np.int64)
            out.append((ids, self._targets(text, spans, ids)))
        if not self.checked and rendered:
            self.checked = True
            n = checked_count([text for text, _ in rendered])
            if any(not (np.array_equal(ids, ref[0]) and np.array_equal(targets, ref[1]))
                   for (ids, targets), ref in zip(out, map(self._reference, rendered[:n]))):  # fmt: skip
                self.byte_lengths = None
                return [self._reference(r) for r in rendered]
        return out

    def _targets(self, text: str, spans: list[tuple[int, int]], ids: np.ndarray) -> np.ndarray:
        if self.train_on_prompt:
            targets = np.ones(len(ids), np.uint8)
        else:
            lengths = self.byte_lengths[ids]
            starts = np.cumsum(lengths) - lengths
            bounds = np.asarray([a for span in spans for a in span], np.int64)
            if not text.isascii():  # character offsets to byte offsets
                at, total, in_bytes = 0, 0, []
                for c in bounds.tolist():
                    total += len(text[at:c].encode("utf-8"))
                    at = c
                    in_bytes.append(total)
                bounds = np.asarray(in_bytes, np.int64)
            targets = (np.searchsorted(bounds, starts, side="right") % 2).astype(np.uint8)  # inside [a, b)
        targets[:1] = 0
        return targets

    def _reference(self, rendered: tuple[str, list]) -> tuple[np.ndarray, np.ndarray]:
        ids, targets = ids_and_targets(self.tokenizer, *rendered, self.train_on_prompt)
        return np.asarray(ids, np.int64), np.asarray(targets, np.uint8)
