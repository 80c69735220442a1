"""The Hugging Face Hub: is it reachable (a quick probe, so an id fails fast without network), and
what to say when loading a hub id fails."""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from urllib.parse import urlsplit

from .bundled import BUNDLED
from .errors import ModelLoadError

_HUB_PROBE_TIMEOUT_S = 2.0
_HUB_PROBE_TTL_S = 60.0
_hub_probe: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when, reason or None)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _probe(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within the timeout; else why not."""
    answer: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
                answer.append(None)
        except OSError as exc:
            answer.append(f"{host}:{port} cannot be reached ({exc.strerror or exc})")

    # In a thread: a DNS look-up has no timeout of its own and can hang on a machine without network.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(_HUB_PROBE_TIMEOUT_S + 0.5)
    return answer[0] if answer else f"{host}:{port} did not answer within {_HUB_PROBE_TIMEOUT_S:.0f} s"


def hub_unreachable() -> str | None:
    """None when the Hugging Face Hub looks reachable; else why not (HF_HUB_OFFLINE, or a quick
    TCP probe of the endpoint, or of the proxy when one is set, failed). Probes at most once a minute."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(var):
            return f"{var} is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxies = urllib.request.getproxies()  # HTTPS_PROXY and friends, as the hub client uses them
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):  # probe the proxy instead
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    else:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None  # nothing sensible to probe: let the hub client try
    now = time.monotonic()
    cached = _hub_probe.get(f"{host}:{port}")
    if cached is not None and now - cached[0] < _HUB_PROBE_TTL_S:
        return cached[1]
    reason = _probe(host, port)
    _hub_probe[f"{host}:{port}"] = (now, reason)
    return reason


def hub_error(spec: str, exc: Exception, offline: bool = False) -> ModelLoadError:
    """The advice for a hub id that could not be loaded: the hub unreachable, no such model, or else."""
    text = f"{type(exc).__name__}: {exc}"
    if offline:  # only the local cache was read (hub_unreachable), and the id is not in it
        reason = hub_unreachable() or "the hub cannot be reached"
        return ModelLoadError(
            f"Could not reach the Hugging Face Hub to fetch {spec!r} ({reason}), and it is not in the "
            f"local hub cache. Use a local folder or .gguf path, or a bundled model: {', '.join(BUNDLED)}."
        )
    offline_markers = ("connect", "offline", "Connection", "resolve", "Network", "couldn't", "LocalEntryNotFound")
    bundled = ", ".join(BUNDLED)
    if any(marker in text for marker in offline_markers):
        return ModelLoadError(
            f"Could not reach the Hugging Face Hub to fetch {spec!r} (it is unreachable from here, "
            f"or the id is not in the local cache). Use a local folder or .gguf path, or a bundled "
            f"model: {bundled}."
        )
    if "not a valid model identifier" in text or "RepositoryNotFound" in text or "404" in text:
        return ModelLoadError(
            f"{spec!r} is not a model on the Hugging Face Hub nor a local path. Check the spelling, "
            f"or use a bundled model: {bundled}."
        )
    return ModelLoadError(f"Could not load {spec!r}: {text}")
