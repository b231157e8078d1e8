"""Conversations to token ids and targets in bulk, for the token store (data/chat.py says what
the ids and targets are, one conversation at a time).

`ChatEncoder` renders a list of conversations with the chat template and tokenizes the texts
together. Rendering a recipe's own template is the slow part (Jinja in Python, 2k + 1 renders
for a conversation of k learned replies, about 1.2 ms for four exchanges on one core), so
`ChatPool` spreads the lists, in parts, over worker processes that each run a `ChatEncoder` of
their own (data/chat_workers.py) once a build has shown it is large enough to pay for them. The
built-in `gptj-chat` is rendered by its Python copy in one pass (data/gptj_chat.py), 0.05 ms,
and then one process is faster than workers (tiktoken already tokenizes on every core).

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
from .chat import GPTJ_CHAT, ChatTemplateError, assistant_spans, ids_and_targets
from .chat_workers import ChatWorker, WorkerGone
from .encode import CHECK_CHARS, available_cores, checked_count, encoder, token_byte_lengths
from .gptj_chat import gptj_chat_spans

Rendered = tuple[str, list[tuple[int, int]]] | str  # (text, assistant spans), or why it could not be rendered
Encoded = tuple[np.ndarray, np.ndarray] | str  # (ids, targets), or why it could not be rendered

START_AFTER = 1024  # conversations encoded here before workers start: ~1.2 s, about a worker's start-up
PART = 32  # conversations handed to a worker at a time (~30 ms of work)


def data_workers(setting: int | str) -> int:
    """`data.workers` as a number: `auto` is every core this process may use."""
    return available_cores() if setting == "auto" else int(setting)


def render_one(tokenizer, template: str, chat: dict) -> Rendered:
    """What assistant_spans gives for a conversation (`messages`, and `tools` where it offers any),
    or why the template's code failed on it (a template whose turns cannot be found at all raises:
    no conversation would render)."""
    try:
        return assistant_spans(tokenizer, template, chat["messages"], chat.get("tools"))
    except ChatTemplateError as e:
        return f"data.chat_template could not render this conversation: {e.reason}"


class ChatPool:
    """`local` (a ChatEncoder) over lists of conversations, in order: handed in ahead (`submit`)
    and collected in the order submitted (`collect`; calling it does both). A list is cut into
    parts of PART. With `workers` > 1, once START_AFTER conversations have been submitted (and
    `local` renders with Jinja, not gptj-chat's Python copy), `workers - 1` worker processes start
    (data/chat_workers.py), each with a ChatEncoder of the same tokenizer, template and settings,
    fed parts by a thread of this process, so a list submitted ahead is encoded while the build
    writes the one before. `collect` encodes here the parts no worker has taken yet, so this
    process is never idle while parts wait (and does them all until the workers are up). A worker
    that ends (killed, out of memory) puts its part back for the others and this process; `close`
    ends them all."""

    def __init__(self, local: ChatEncoder, workers: int, start_after: int | None = None):
        self.local = local
        self.workers = workers
        self.start_after = START_AFTER if start_after is None else start_after
        self.seen = 0
        self.in_workers = 0  # conversations the workers encoded (for tests and the benchmark)
        self.lost = ""  # why a worker ended, if one did
        self._todo: queue.Queue = queue.Queue()  # (ticket, part index, conversations); None: a thread's end
        self._results: dict[int, list] = {}  # ticket -> each part's encodings (None until done)
        self._failed: dict[int, Exception] = {}
        self._changed = threading.Condition()
        self._tickets = 0
        self._workers: list[ChatWorker] = []
        self._threads: list[threading.Thread] = []

    def __call__(self, conversations: list[dict]) -> list[Encoded]:
        return self.collect(self.submit(conversations))

    def submit(self, conversations: list[dict]) -> int:
        self.seen += len(conversations)
        if self.seen > self.start_after and self.local.python_render is None:  # (gptj-chat in Python: faster alone)
            self.start()
        ticket, self._tickets = self._tickets, self._tickets + 1
        parts = [conversations[i : i + PART] for i in range(0, len(conversations), PART)]
        with self._changed:
            self._results[ticket] = [None] * len(parts)
        for index, part in enumerate(parts):
            self._todo.put((ticket, index, part))
        return ticket

    def collect(self, ticket: int) -> list[Encoded]:
        results = self._results[ticket]
        while True:
            with self._changed:
                if ticket in self._failed:
                    del self._results[ticket]
                    raise self._failed.pop(ticket)
                if all(r is not None for r in results):
                    del self._results[ticket]
                    return [encoded for part in results for encoded in part]
            items = self._take(ticket, every=not self._threads)  # no workers: one call for the lot, as fast as before
            if not items:  # its parts are all with workers: wait for an answer (or a part put back)
                with self._changed:
                    self._changed.wait_for(lambda: ticket in self._failed or all(r is not None for r in results)
                                           or self._ours(ticket), timeout=1.0)  # fmt: skip
                continue
            encoded = self.local([m for _, _, part in items for m in part])
            with self._changed:
                for part_ticket, index, part in items:
                    if part_ticket in self._results:
                        self._results[part_ticket][index] = encoded[: len(part)]
                    encoded = encoded[len(part) :]

    def _ours(self, ticket: int) -> bool:
        """Whether the next waiting part is of `ticket` (or before it): one for this process to take.
        Parts of lists handed in ahead are the workers' (taking them here would leave them idle
        while this process writes)."""
        with self._todo.mutex:
            return bool(self._todo.queue) and self._todo.queue[0] is not None and self._todo.queue[0][0] <= ticket

    def _take(self, ticket: int, every: bool) -> list[tuple]:
        """The next waiting part of `ticket` or before (`every`: all of them), for this process."""
        taken = []
        with self._todo.mutex:
            while self._todo.queue and self._todo.queue[0] is not None and self._todo.queue[0][0] <= ticket:
                taken.append(self._todo.queue.popleft())
                if not every:
                    break
        return taken

    def start(self, wait: bool = False) -> None:
        """Start the workers in the background (`wait`: until each has loaded the tokenizer or ended)."""
        if not self._threads and self.workers > 1 and os.name == "posix":
            self._workers = [ChatWorker() for _ in range(self.workers - 1)]
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

    def _feed(self, worker: ChatWorker) -> None:
        """A worker's thread: start it, then encode parts with it until told to end or it ends."""
        try:
            worker.start(self.local.tokenizer, self.local.template, self.local.train_on_prompt)
            while (item := self._todo.get()) is not None:
                ticket, index, part = item
                try:
                    encoded = worker.encode(part)
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
                        self._results[ticket][index] = encoded
                        self.in_workers += len(part)
                    self._changed.notify_all()
        except WorkerGone as e:
            with self._changed:
                self.lost = self.lost or str(e)
                self._changed.notify_all()


def turn_shape(chat: dict) -> tuple:
    """A conversation's kind, for checking gptj-chat's Python copy on each kind a build meets: which
    roles and what replies it holds, in which order of first appearance, and whether it has tools."""
    kinds = []
    for m in chat["messages"]:
        kind = (m["role"], bool(m.get("tool_calls")), bool(m.get("content")), m.get("weight", 1))
        if kind not in kinds:
            kinds.append(kind)
    return bool(chat.get("tools")), chat["messages"][0]["role"], tuple(kinds)


class ChatEncoder:
    """Conversations to (ids, targets) as `chat_ids` gives them, a list at a time: each rendered
    (`render_one`), the texts tokenized together by `encode` (tiktoken for GPT-2's BPE), and a token
    is a target when its first byte lies in an assistant span, its byte offset summed from the
    tokens' byte lengths instead of read from the tokenizer's offset mapping (which tokenizes one
    text at a time, in one thread: half the time of a chat build before). Without byte lengths (not
    a byte-level BPE), or when the first CHECK_CHARS characters differ from the offset mapping's ids
    and targets in any id or target, every conversation goes the offset mapping's way. With the
    built-in `gptj-chat`, conversations are rendered by its Python copy (data/gptj_chat.py) in one
    pass each, compared with the Jinja renderer on the first CHECK_CHARS characters and on the first
    conversation of each kind (`turn_shape`) in the same way.
    A conversation the template cannot render gives the reason (a string) in its place."""

    def __init__(self, tokenizer, template: str, train_on_prompt: bool, encode, byte_lengths):
        self.tokenizer, self.template, self.train_on_prompt = tokenizer, template, train_on_prompt
        self.encode, self.byte_lengths = encode, byte_lengths
        self.unchecked = 0 if byte_lengths is None else CHECK_CHARS  # characters still to compare
        eos = tokenizer.eos_token
        self.python_render = (lambda m, t: gptj_chat_spans(m, t, eos)) if template == GPTJ_CHAT and isinstance(eos, str) else None
        self.render_unchecked = CHECK_CHARS  # characters of python_render's still to compare with Jinja's
        self.shapes_checked: set[tuple] = set()  # the kinds of conversation compared so far (turn_shape)

    @classmethod
    def of(cls, tokenizer, template: str, train_on_prompt: bool, threads: int | None = None) -> ChatEncoder:
        """One with an encoder of its own (a worker's; tiktoken in `threads` threads)."""
        encode, name = encoder(tokenizer, threads)
        return cls(tokenizer, template, train_on_prompt, encode, token_byte_lengths(tokenizer) if name == "tiktoken" else None)

    @property
    def fast(self) -> bool:
        return self.byte_lengths is not None

    def __call__(self, conversations: list[dict]) -> list[Encoded]:
        out: list = [self._render(chat) for chat in conversations]
        good = [i for i, r in enumerate(out) if not isinstance(r, str)]
        rendered = [out[i] for i in good]
        for i, encoded in zip(good, self._fast(rendered) if self.fast else map(self._reference, rendered)):
            out[i] = encoded
        return out

    def _render(self, chat: dict) -> Rendered:
        if self.python_render is None:
            return render_one(self.tokenizer, self.template, chat)
        try:
            got = self.python_render(chat["messages"], chat.get("tools"))
        except Exception:  # (not the shape the template expects: the Jinja way says what is wrong with it)
            return render_one(self.tokenizer, self.template, chat)
        shape = turn_shape(chat)
        if self.render_unchecked > 0 or shape not in self.shapes_checked:  # the first characters, and each new kind of turns
            self.shapes_checked.add(shape)
            want = render_one(self.tokenizer, self.template, chat)
            self.render_unchecked -= len(got[0])
            if want != got:  # the copy is wrong: Jinja's rendering for this build from here on
                self.python_render, self.render_unchecked = None, 0
                return want
        return got

    def _fast(self, rendered: list[tuple[str, list]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for (text, spans), ids in zip(rendered, self.encode([text for text, _ in rendered])):
            ids = np.asarray(ids, np.int64)
            out.append((ids, self._targets(text, spans, ids)))
        if self.unchecked > 0 and rendered:
            n = checked_count([text for text, _ in rendered], self.unchecked)
            self.unchecked -= sum(len(text) for text, _ in rendered[:n])
            if any(not (np.array_equal(ids, ref[0]) and np.array_equal(targets, ref[1]))
                   for (ids, targets), ref in zip(out, map(self._reference, rendered[:n]))):  # fmt: skip
                self.byte_lengths, self.unchecked = None, 0
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
