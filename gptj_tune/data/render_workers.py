"""Worker processes that render conversations with a chat template, fed pickled frames over their
standard input and output.

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
import select
import struct
import subprocess
import sys
import threading

_HEADER = struct.Struct("<Q")
_SERVE = "from gptj_tune.data.render_workers import serve; serve()"


class WorkerGone(Exception):
    """The worker ended or stopped answering in the protocol (killed, out of memory, no Python)."""


class RenderWorker:
    """One worker process: `send` a list of conversations, `receive` what `render_one` gives for each."""

    def __init__(self, tokenizer, template: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the modules this process sees
        self.process = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
        self.ready = False
        # the tokenizer (~1.5 MB pickled for GPT-2's) is more than a pipe holds until the worker has
        # started reading: sent from a thread, so the build goes on meanwhile
        self._first = threading.Thread(target=self._send_quietly, args=((tokenizer, template),), daemon=True)
        self._first.start()

    def _send_quietly(self, payload) -> None:
        try:
            self.send(payload)
        except WorkerGone:
            pass  # poll_ready finds the worker gone

    def poll_ready(self) -> bool:
        """Whether it has loaded the tokenizer and waits for work (without waiting for it)."""
        if not self.ready and select.select([self.process.stdout], [], [], 0)[0]:
            self.ready = self.receive() == "ready"
            if not self.ready:
                raise WorkerGone("a data worker did not start")
        return self.ready

    def send(self, payload) -> None:
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.process.stdin.write(_HEADER.pack(len(data)) + data)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerGone(f"a data worker ended (exit {self.process.poll()})") from e

    def receive(self):
        header = self.process.stdout.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise WorkerGone(f"a data worker ended (exit {self.process.wait()})")
        (size,) = _HEADER.unpack(header)
        data = self.process.stdout.read(size)
        if len(data) < size:
            raise WorkerGone(f"a data worker ended (exit {self.process.wait()})")
        kind, value = pickle.loads(data)  # our own child's frames, over a pipe only we hold
        if kind == "raised":  # a GptjTuneError of the template's shape: the build's to report
            raise value
        return value

    def close(self) -> None:
        if not self.ready:  # still starting (or never will): nothing of its to wait for
            self.process.kill()
        self._first.join()
        for pipe in (self.process.stdin, self.process.stdout):  # a worker blocked writing an answer unread gets EPIPE
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve() -> None:
    """The worker's side: read the tokenizer and template, answer each list of conversations."""
    from ..errors import GptjTuneError
    from .chat_encode import render_one

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing printed by a library may land in the frames

    def read():
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        return pickle.loads(stdin.read(_HEADER.unpack(header)[0]))

    def write(kind: str, value) -> None:
        data = pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(_HEADER.pack(len(data)) + data)
        stdout.flush()

    tokenizer, template = read()
    write("value", "ready")
    while (conversations := read()) is not None:
        try:
            write("value", [render_one(tokenizer, template, m) for m in conversations])
        except GptjTuneError as e:
            write("raised", e)
