"""Getting named weights without surprises: offline checks, quiet downloads, readable refusals.

    offline_reason(host)        why a download cannot work now (HF_HUB_OFFLINE, no route), or None
    stdout_to_stderr()          torch.hub prints `Downloading: ...` on stdout; keep stdout for --json
    pickle_refusal(path, exc)   one plain sentence for a checkpoint that weights_only=True refused

A machine without network spends about a minute in huggingface_hub's retries before it fails;
`offline_reason` answers in at most a few seconds (one TCP connection attempt, in a thread so a
hanging DNS lookup cannot hold the run), so `xai explain` and `xai check` stop with advice instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XAI_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def _env_offline() -> str | None:
    for k in OFFLINE_ENV:
        if os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{k}={os.environ[k]} is set"
    return None


def reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (DNS included)."""
    ok: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def offline_reason(host: str) -> str | None:
    """None when a download from `host` may work; else why not, in a few words."""
    env = _env_offline()
    if env:
        return env
    if not reachable(host):
        return f"{host} cannot be reached (no network?)"
    return None


def offline_advice(reason: str) -> str:
    return (
        f"the weights are not cached and cannot be downloaded: {reason}. Run once with network to fill "
        "the cache (torch hub: ~/.cache/torch/hub/checkpoints, timm/Hugging Face: ~/.cache/huggingface), "
        "pass a local checkpoint with `weights: path/to/file.safetensors`, or use `model: default` "
        "(embedded); on an offline machine set HF_HUB_OFFLINE=1 so nothing waits for the network"
    )


def torch_hub_cached(url: str) -> bool:
    """Whether torch.hub's checkpoint cache already holds the file of `url`."""
    import torch.hub

    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])).is_file()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Messages that libraries print on stdout (torch.hub's `Downloading: ...`) go to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def pickle_refusal(path: Path | str, exc: BaseException) -> str:
    """A whole sentence for a checkpoint that torch.load(weights_only=True) refused (no ANSI codes)."""
    text = ANSI.sub("", str(exc))
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    what = f"a pickled Python object ({m.group(1)})" if m else "pickled Python objects"
    if not m:
        first = " ".join(text.split())[:160]
        what += f" ({first})" if first else ""
    return (
        f"model.weights: refused to load {path}: it holds {what}, not only tensors, and unpickling it "
        "could run code. Save the weights alone: torch.save(model.state_dict(), 'model.pt'), or better "
        "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
    )
