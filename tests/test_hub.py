"""No route to the hub: one line at once, not a minute of huggingface_hub's retries."""

from __future__ import annotations

import os

from conftest import cli, write_recipe


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", f"model:\n  name_or_path: EleutherAI/gpt-j-6b\noutput:\n  dir: {tmp_path / 'run'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: what a machine without a route to the hub sees
    result = cli("run", str(recipe), env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Retrying" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert "could not be reached from this machine within 3 s, so only the local cache was looked in" in result.stderr.replace("\n", " ")
    assert "hf download EleutherAI/gpt-j-6b" in result.stderr.replace("\n", " ")


def test_the_probe_connects_through_the_proxy_the_environment_names_unless_no_proxy_excludes_the_host(monkeypatch):
    """A machine that reaches the hub (or a tracker's server) only through a proxy: the probe opens
    a connection to the proxy, as the real client would; a NO_PROXY host is tried directly."""
    import socket

    from gptj_tune.hub import connects

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as proxy, socket.socket() as closed:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        target = f"https://127.0.0.1:{closed.getsockname()[1]}"
        assert not connects(target)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert connects(target)
        assert not connects(target.replace("https", "http"))  # an http:// server is not behind the HTTPS proxy
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert not connects(target)
