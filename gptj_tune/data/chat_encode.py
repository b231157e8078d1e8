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
import queue
import threading
import time

import numpy as np

from ..errors import GptjTuneError
from .chat import ChatTemplateError, assistant_spans, ids_and_targets
from .encode import checked_count
from .render_workers import RenderWorker, WorkerGone

Rendered = tuple[str, list[tuple[int, int]]] | str  # (text, assistant spans), or why it could not be rendered

START_AFTER = 1024  # conversations rendered here before workers start: ~0.9 s, about a worker's start-up (1.2 s)
PART = 32  # conversations handed to a worker at a time (~25 ms of rendering)


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
    """`render_one` over lists of conversations, in order: handed in ahead (`submit`) and collected
    in the order submitted (`collect`; calling it does both). A list is cut into parts of PART.
    With `workers` > 1, once START_AFTER conversations have been submitted, `workers - 1` worker
    processes start (data/render_workers.py), each fed parts by a thread of this process, so a
    list submitted ahead is rendered while the build works on the one before. `collect` renders
    here the parts no worker has taken yet, so this process is never idle while parts wait (and
    renders everything until the workers are up). A worker that ends (killed, out of memory) puts
    its part back for the others and this process; `close` ends them all."""

    def __init__(self, tokenizer, template: str, workers: int, start_after: int | None = None):
        self.tokenizer, self.template = tokenizer, template
        self.workers = workers
        self.start_after = START_AFTER if start_after is None else start_after
        self.seen = 0
        self.in_workers = 0  # conversations the workers rendered (for tests and the benchmark)
        self.lost = ""  # why a worker ended, if one did
        self._todo: queue.Queue = queue.Queue()  # (ticket, part index, conversations); None: a thread's end
        self._results: dict[int, list] = {}  # ticket -> each part's renders (None until done)
        self._failed: dict[int, Exception] = {}
        self._changed = threading.Condition()
        self._tickets = 0
        self._workers: list[RenderWorker] = []
        self._threads: list[threading.Thread] = []

    def __call__(self, conversations: list[list[dict]]) -> list[Rendered]:
        return self.collect(self.submit(conversations))

    def submit(self, conversations: list[list[dict]]) -> int:
        self.seen += len(conversations)
        if self.seen > self.start_after:
            self.start()
        ticket, self._tickets = self._tickets, self._tickets + 1
        parts = [conversations[i : i + PART] for i in range(0, len(conversations), PART)]
        with self._changed:
            self._results[ticket] = [None] * len(parts)
        for index, part in enumerate(parts):
            self._todo.put((ticket, index, part))
        return ticket

    def collect(self, ticket: int) -> list[Rendered]:
        results = self._results[ticket]
        while True:
            with self._changed:
                if ticket in self._failed:
                    del self._results[ticket]
                    raise self._failed.pop(ticket)
                if all(r is not None for r in results):
                    del self._results[ticket]
                    return [rendered for part in results for rendered in part]
            try:
                item = self._todo.get_nowait()
            except queue.Empty:  # every part is with a worker: wait for an answer (or a part put back)
                with self._changed:
                    self._changed.wait_for(lambda: ticket in self._failed or all(r is not None for r in results)
                                           or not self._todo.empty(), timeout=1.0)  # fmt: skip
                continue
            if item is None:  # not ours (close): leave it for the threads
                self._todo.put(None)
                continue
            part_ticket, index, part = item
            rendered = [render_one(self.tokenizer, self.template, m) for m in part]
            with self._changed:
                if part_ticket in self._results:
                    self._results[part_ticket][index] = rendered

    def start(self, wait: bool = False) -> None:
        """Start the workers in the background (`wait`: until each has loaded the tokenizer or ended)."""
        if not self._threads and self.workers > 1 and os.name == "posix":
            self._workers = [RenderWorker() for _ in range(self.workers - 1)]
            self._threads = [threading.Thread(target=self._feed, args=(w,), daemon=True) for w in self._workers]
            for thread in self._threads:
                thread.start()
        while wait and any(not w.ready and t.is_alive() for w, t in zip(self._workers, self._threads)):
            time.sleep(0.02)

    def close(self) -> None:
        while True:  # parts nobody needs now
            try:
                self._todo.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._todo.put(None)
        for worker in self._workers:
            worker.close()  # a thread waiting on its worker finds it gone and ends
        for thread in self._threads:
            thread.join()

    def _feed(self, worker: RenderWorker) -> None:
        """A worker's thread: start it, then render parts with it until told to end or it ends."""
        try:
            worker.start(self.tokenizer, self.template)
            while (item := self._todo.get()) is not None:
                ticket, index, part = item
                try:
                    rendered = worker.render(part)
                except WorkerGone:
                    self._todo.put(item)  # for another worker, or this process
                    raise
                except GptjTuneError as e:  # the template's shape: the build stops with it
                    with self._changed:
                        self._failed[ticket] = e
                        self._changed.notify_all()
                    continue
                with self._changed:
                    if ticket in self._results:
                        self._results[ticket][index] = rendered
                        self.in_workers += len(part)
                    self._changed.notify_all()
        except WorkerGone as e:
            with self._changed:
                self.lost = self.lost or str(e)
                self._changed.notify_all()


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
        return self.collect(self.submit(conversations))

    def submit(self, conversations: list[list[dict]]) -> int:
        """Hand conversations in to be rendered ahead (by the workers, while the build works on
        what it submitted before); `collect` their results in the order submitted."""
        return self.render.submit(conversations)

    def collect(self, ticket: int) -> list[tuple[np.ndarray, np.ndarray] | str]:
        out: list = self.render.collect(ticket)
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
