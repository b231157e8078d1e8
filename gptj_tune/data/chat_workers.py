"""Worker processes that turn conversations into token ids and targets (a ChatEncoder each), fed
pickled frames over their standard input and output.

Not `multiprocessing`: its spawn start method imports the parent's main script again in every
worker, so a user's script that builds data without an `if __name__ == "__main__":` guard starts
workers that start workers (here that hung the build), and fork copies a process whose threads
(rich's progress, tokenizer and torch pools) may hold locks. A worker here is a fresh
`python -c` that imports gptj_tune alone and holds the tokenizer it is sent. It runs in a session
of its own, so a Ctrl-C reaches only the build, which ends it; it exits when its input closes, so
a build that is killed leaves none behind.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys

_HEADER = struct.Struct("<Q")
_SERVE = "from gptj_tune.data.chat_workers import serve; serve()"


class WorkerGone(Exception):
    """The worker ended or stopped answering in the protocol (killed, out of memory, no Python)."""


class ChatWorker:
    """One worker process. `start` sends it the tokenizer, template and train_on_prompt and waits
    until it has built its ChatEncoder; then `encode` a list of conversations: what a ChatEncoder
    gives for each. Both block: the build calls them from a thread of its own per worker."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the modules this process sees
        self.process = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
        self.ready = False

    def start(self, tokenizer, template: str, train_on_prompt: bool) -> None:
        self._send((tokenizer, template, train_on_prompt))
        self.ready = self._receive() == "ready"

    def encode(self, conversations: list[dict]) -> list:
        self._send(conversations)
        return self._receive()

    def _send(self, payload) -> None:
        try:
            _write_frame(self.process.stdin, payload)
        except (OSError, ValueError) as e:  # ValueError: the pipe was closed by `close`
            raise WorkerGone(f"a data worker ended (exit {self.process.poll()})") from e

    def _receive(self):
        try:
            frame = _read_frame(self.process.stdout)
        except (OSError, ValueError) as e:
            raise WorkerGone("a data worker was closed") from e
        if frame is None:
            raise WorkerGone(f"a data worker ended (exit {self.process.wait()})")
        kind, value = frame  # our own child's frames, over a pipe only we hold
        if kind == "raised":  # a GptjTuneError of the template's shape: the build's to report
            raise value
        return value

    def close(self) -> None:
        """End it at once (it holds nothing but the tokenizer; starting or busy, nothing to wait for)."""
        self.process.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.process.wait()


def serve() -> None:
    """The worker's side: read the tokenizer, template and train_on_prompt, answer each list of
    conversations with its ChatEncoder (tiktoken in one thread: one worker a core)."""
    from ..errors import GptjTuneError
    from .chat_encode import ChatEncoder

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing printed by a library may land in the frames
    tokenizer, template, train_on_prompt = _read_frame(stdin)
    chats = ChatEncoder.of(tokenizer, template, train_on_prompt, threads=1)
    _write_frame(stdout, ("value", "ready"))
    while (conversations := _read_frame(stdin)) is not None:
        try:
            _write_frame(stdout, ("value", chats(conversations)))
        except GptjTuneError as e:
            _write_frame(stdout, ("raised", e))


def _write_frame(stream, payload) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_frame(stream):
    """The next pickled frame, or None where the stream ends (before or inside a frame)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None
