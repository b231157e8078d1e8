"""A chat build's bulk path (data/chat_encode.py, data/chat_workers.py): conversations encoded by
worker processes give what one process gives (ids, targets, a template's refusal), a worker that dies costs nothing but time, and a
template that fails on a conversation is a file:line error or a skipped record, not a Jinja
traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_chat import CONVERSATIONS, chat_section

from gptj_tune.data import prepare_data
from gptj_tune.data.chat import GPTJ_CHAT, messages_of
from gptj_tune.data.chat import chat_ids
from gptj_tune.data.chat_encode import PART, ChatEncoder, ChatPool
from gptj_tune.data.cache import cache_key
from gptj_tune.errors import DataError
from gptj_tune.recipe import DataSection, SourceSection

ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
               "{% if add_generation_prompt %}[assistant] {% endif %}")  # fmt: skip
REPLY_FIRST = {"messages": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello"}]}  # fmt: skip


def pool(tokenizer, template: str, workers: int, **options) -> ChatPool:
    return ChatPool(ChatEncoder.of(tokenizer, template, False), workers, **options)


def one_at_a_time(tokenizer, template: str, conversations: list[dict]) -> list:
    """chat_ids per conversation (the reference), or the template's reason as the pool gives it."""
    out = []
    for chat in conversations:
        try:
            out.append(tuple(chat_ids(tokenizer, template, chat["messages"], False, chat.get("tools"))))
        except DataError as e:
            out.append(f"data.chat_template could not render this conversation: {e.reason}")
    return out


def as_lists(encoded: list) -> list:
    return [r if isinstance(r, str) else (r[0].tolist(), r[1].tolist()) for r in encoded]


def conversations(n: int) -> list[dict]:
    out = [messages_of(r, "x") for r in CONVERSATIONS[1:]]  # no system turn: ALTERNATING renders them all
    return [{"messages": [{**m, "content": f"{m['content']} #{i}"} for m in out[i % len(out)]]} for i in range(n)]


def test_worker_processes_encode_what_this_process_encodes_in_order(gpt2_tokenizer):
    lists = [conversations(300), conversations(17), conversations(0), conversations(301)]
    lists[0][7] = {"messages": messages_of(REPLY_FIRST, "x")}  # the template raises on it: its reason comes back in its place
    chats = pool(gpt2_tokenizer, ALTERNATING, workers=3)
    try:
        chats.start(wait=True)
        tickets = [chats.submit(c) for c in lists]  # handed in ahead, as the build does a chunk ahead
        got = [as_lists(chats.collect(t)) for t in tickets]
        assert chats.in_workers >= PART  # the workers took parts (this process took the ones left)
        assert len(chats._workers) == 2 and not chats.lost
    finally:
        chats.close()
    assert got == [one_at_a_time(gpt2_tokenizer, ALTERNATING, c) for c in lists]
    assert got[0][7] == ("data.chat_template could not render this conversation: TemplateError: Conversation roles must "
                         "alternate user/assistant/user/assistant/...")  # fmt: skip
    assert sum(isinstance(r, str) for r in got[0]) == 1 and gpt2_tokenizer.decode(got[0][8][0]).startswith("[user] ")


def test_workers_start_only_after_enough_conversations_and_not_for_gptj_chat_in_python(gpt2_tokenizer):
    python = pool(gpt2_tokenizer, GPTJ_CHAT, workers=2, start_after=0)
    python(conversations(100))
    assert not python._workers  # rendered in Python: this process alone is faster than with workers
    renderer = pool(gpt2_tokenizer, ALTERNATING, workers=2, start_after=100)
    try:
        renderer(conversations(100))
        assert not renderer._workers  # 100 rendered here: a small build never pays for a worker's start-up
        renderer(conversations(10))
        assert len(renderer._workers) == 1
        starting = renderer._workers[0].process
    finally:
        renderer.close()  # a build that ends before its workers are up does not wait for them
    assert starting.poll() is not None
    alone = pool(gpt2_tokenizer, ALTERNATING, workers=1, start_after=0)  # data.workers: 1
    alone(conversations(10))
    assert not alone._workers and alone.in_workers == 0


def test_a_killed_worker_puts_its_part_back_and_the_build_goes_on(gpt2_tokenizer):
    many = conversations(900)
    renderer = pool(gpt2_tokenizer, GPTJ_CHAT, workers=3)
    try:
        renderer.start(wait=True)
        processes = [w.process for w in renderer._workers]
        os.kill(processes[1].pid, signal.SIGKILL)
        processes[1].wait()
        assert as_lists(renderer(many)) == one_at_a_time(gpt2_tokenizer, GPTJ_CHAT, many)
        assert renderer.lost == "a data worker ended (exit -9)"  # its thread met it dead and put the part back
        assert processes[0].poll() is None and renderer.in_workers > 0  # the other one goes on
    finally:
        renderer.close()
    assert all(p.poll() is not None for p in processes)  # none left behind


def test_a_template_whose_turns_cannot_be_found_stops_the_build_from_a_worker_too(gpt2_tokenizer):
    """A template that renders earlier turns differently once later ones follow is wrong for every
    conversation: the DataError a worker meets reaches the build, and closing ends the workers."""
    numbered = "{% for m in messages %}{{ messages | length }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
    renderer = pool(gpt2_tokenizer, numbered, workers=2)
    try:
        renderer.start(wait=True)
        processes = [w.process for w in renderer._workers]
        with pytest.raises(DataError, match="rendering a conversation turn by turn does not give its beginning"):
            renderer(conversations(40))
    finally:
        renderer.close()
    assert all(p.poll() is not None for p in processes)


def test_a_script_without_a_main_guard_can_use_workers(tmp_path, shared_data):
    """multiprocessing's spawn would import this script again in each worker (which would start
    workers of its own: it hung); our workers import gptj_tune alone."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from transformers import AutoTokenizer
        from gptj_tune.data.chat import GPTJ_CHAT
        from gptj_tune.data.chat_encode import ChatEncoder, ChatPool
        tok = AutoTokenizer.from_pretrained({str(shared_data / "gpt2-tokenizer")!r})
        renderer = ChatPool(ChatEncoder.of(tok, GPTJ_CHAT, False), workers=2)
        renderer.start(wait=True)
        tickets = [renderer.submit([{{"messages": [{{"role": "user", "content": "hi"}}, {{"role": "assistant", "content": "yo"}}]}}] * 64)
                   for _ in range(10)]
        out = [r for t in tickets for r in renderer.collect(t)]
        renderer.close()
        print("rendered", len(out), "in workers", renderer.in_workers > 0)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["rendered", "640", "in", "workers", "True"]


def test_a_conversation_the_template_cannot_render_is_a_file_line_error_or_skipped(tmp_path, gpt2_tokenizer):
    records = CONVERSATIONS[1:] + [REPLY_FIRST] + CONVERSATIONS[1:]
    section = chat_section(tmp_path, records, chat_template=ALTERNATING)
    path = section.sources[0].path
    with pytest.raises(DataError) as raised:
        prepare_data(section, gpt2_tokenizer)
    assert str(raised.value) == (f"{path}:3: data.chat_template could not render this conversation: TemplateError: "
                                 "Conversation roles must alternate user/assistant/user/assistant/... (fix the record or "
                                 "the template, or set data.on_bad_record: skip to skip such records)")  # fmt: skip
    data = prepare_data(section.model_copy(update={"on_bad_record": "skip"}), gpt2_tokenizer)
    meta = data.store.meta
    assert len(data.train_rows) == 4 and data.skipped_records == 1
    assert meta["skipped_messages"][0].startswith(f"{path}:3: data.chat_template could not render")
    assert meta["sources"][0]["records"] == 4  # gone as a bad record is, not counted as a dropped example
    assert all(gpt2_tokenizer.decode(row.input_ids).startswith("[user] ") for row in data.train_rows)


def test_a_template_that_fails_on_every_conversation_names_why(tmp_path, gpt2_tokenizer):
    section = chat_section(tmp_path, CONVERSATIONS, chat_template="{{ messages[0]['content'] + no_such_function() }}",
                           on_bad_record="skip")  # fmt: skip
    with pytest.raises(DataError) as raised:
        prepare_data(section, gpt2_tokenizer)
    message = str(raised.value)
    assert message.startswith(f"data.sources[0]: no usable records in {section.sources[0].path} (3 skipped; the last: ")
    assert message.endswith(":3: data.chat_template could not render this conversation: UndefinedError: "
                            "'no_such_function' is undefined)")  # fmt: skip


def test_data_workers_is_checked_and_does_not_change_the_store(tmp_path, gpt2_tokenizer):
    from pydantic import ValidationError

    for bad in (0, -1, "many"):
        with pytest.raises(ValidationError, match="workers"):
            DataSection(sources=[SourceSection(format="synthetic")], workers=bad)
    section = chat_section(tmp_path, CONVERSATIONS * 30)
    sections = [section.model_copy(update={"workers": w, "cache_dir": str(tmp_path / f"cache-{w}")}) for w in ("auto", 1, 3)]
    assert len({cache_key(s, gpt2_tokenizer, 0) for s in sections}) == 1  # a store built with any number is reused
    stores = [prepare_data(s, gpt2_tokenizer) for s in sections]
    first = stores[0]
    assert all(s.built for s in stores)
    for other in stores[1:]:
        assert all(np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
                   for a, b in zip(first.train_rows, other.train_rows))  # fmt: skip


@pytest.mark.slow
def test_a_killed_build_leaves_no_worker_behind(tmp_path, shared_data):
    """SIGKILL gives the build no chance to end its workers: they see their input close and exit."""
    import time

    records = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]} for i in range(60000)]
    section = chat_section(tmp_path, records, workers=2, chat_template=ALTERNATING)  # Jinja's rendering: workers start
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(f"""
        from transformers import AutoTokenizer
        from gptj_tune.data import prepare_data
        from gptj_tune.recipe import DataSection
        tok = AutoTokenizer.from_pretrained({str(shared_data / "gpt2-tokenizer")!r})
        tok.eos_token = "<|endoftext|>"
        prepare_data(DataSection.model_validate_json({section.model_dump_json()!r}), tok)
    """))
    build = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 60
        while not workers and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == build.pid and
                       b"chat_workers" in _read(f"/proc/{p}/cmdline")]  # fmt: skip
        assert workers, "the build ended or started no worker"
        time.sleep(2)  # up (1.2 s) and working: killed mid-build, not mid-start
        assert build.poll() is None, "the build ended before it could be killed"
        build.kill()
        build.wait()
        deadline = time.monotonic() + 20
        while any(_running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(p) for p in workers)
    finally:
        build.kill()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parent(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    return int(stat.rsplit(b")", 1)[1].split()[1]) if stat else -1


def _running(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")  # a zombie has exited
