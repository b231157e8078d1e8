"""Whether the Hugging Face hub can be reached, found out once with a short connection attempt
(`connects`, which the trackers' check uses for their servers too).

Without it, a machine with no route to the hub (an offline cluster node, a firewall) spent about a
minute in huggingface_hub's retries, printing a dozen `Retrying in 8s` lines, before our one-line
error. When the hub (or the proxy that reaches it) does not answer within PROBE_TIMEOUT, this
process goes offline at once: the local cache still serves what it holds, and anything else fails
within seconds with our message.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

PROBE_TIMEOUT = 3.0
_TRUE = ("1", "true", "yes", "on")
_forced = False  # whether the probe, not the user, made this process offline


def offline_by_choice() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def connects(address: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the server of the URL `address` (or to the proxy that the
    environment's *_PROXY variables name for it, NO_PROXY honoured) opens within `timeout`."""
    from urllib.request import getproxies, proxy_bypass

    url = urlparse(address)
    proxies = getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.cache
def hub_reachable() -> bool:
    """True when a connection to the hub's endpoint (or its proxy) opens within PROBE_TIMEOUT;
    otherwise this process is switched to offline mode and False is returned."""
    if offline_by_choice():
        return False
    if connects(os.environ.get("HF_ENDPOINT") or "https://huggingface.co"):
        return True
    _go_offline()
    return False


def probe_unless_local(name: str) -> None:
    """Probe the hub before a load that may go to it (a name that is not a local path)."""
    from pathlib import Path

    if not Path(name).exists():
        hub_reachable()


def unreachable_note() -> str:
    """What an error about a hub download should say when the probe found no hub, else ''."""
    if not _forced:
        return ""
    return (f" The hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) could not be reached from this machine "
            f"within {PROBE_TIMEOUT:.0f} s, so only the local cache was looked in.")  # fmt: skip


def _go_offline() -> None:
    global _forced
    _forced = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # read at import time: the module values count, not the environment
        hub.HF_HUB_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        import huggingface_hub

        home = sys.modules.get(getattr(huggingface_hub.is_offline_mode, "__module__", ""), None)
        if home is not None and hasattr(home, "HF_HUB_OFFLINE"):
            home.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(config, name):
                setattr(config, name, True)
