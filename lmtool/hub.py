"""Model references: a local folder or file, or a Hub id with an optional @revision.

Hub ids go through huggingface_hub, so its shared cache, HF_TOKEN and HF_HUB_OFFLINE apply as
they do for every other tool. config.json is fetched first and its family checked before any
weight is downloaded; then only the files lmtool reads are fetched (no .bin, Flax or ONNX copies).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import LmtoolError, ModelNotFoundError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What lmtool reads from a standard folder; everything else in a Hub repo is left alone.
WANTED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


@dataclass
class ModelRef:
    text: str  # what the user typed
    path: Path | None  # local path, once resolved
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


def parse(ref: str) -> ModelRef:
    """Classify a reference without touching the network."""
    path = Path(ref).expanduser()
    if path.exists():
        return ModelRef(ref, path)
    repo, _, revision = ref.partition("@")
    looks_local = ref.startswith((".", "/", "~")) or ref.endswith((".safetensors", ".ckpt", ".pt", ".json"))
    if looks_local or not REPO_ID.match(repo) or repo.count("/") > 1:
        raise ModelNotFoundError(f"{ref}: no such file or folder")
    return ModelRef(ref, None, repo, revision or None)


# How long the Hub may take to accept a connection before lmtool treats the machine as offline.
REACHABLE_TIMEOUT_S = 3.0
_checked_reachable = False
# The proxy settings httpx reads, for http (False) and https (True) endpoints.
PROXY_VARIABLES = {
    False: ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
    True: ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
}


def _hub_reachable(timeout: float) -> bool:
    """Whether the Hub's endpoint accepts a TCP connection within timeout (name lookup included,
    which a socket timeout does not bound, hence the thread)."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = next((os.environ[name] for name in PROXY_VARIABLES[endpoint.scheme == "https"] if os.environ.get(name)), None)
    if proxy:  # behind a proxy the Hub is reached through it, and maybe only through it
        endpoint = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def prepare_hub() -> None:
    """Before the first Hub call: without a network, switch huggingface_hub to offline mode (the
    local cache still serves), instead of its half a minute of retries; and keep its retry and
    warning messages off stderr (lmtool reports failures in one line)."""
    global _checked_reachable
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    if _checked_reachable or constants.HF_HUB_OFFLINE:
        return
    _checked_reachable = True
    if not _hub_reachable(REACHABLE_TIMEOUT_S):
        constants.HF_HUB_OFFLINE = True


def _hub_error(ref: ModelRef, exc: Exception) -> LmtoolError:
    from huggingface_hub import errors

    name = ref.repo_id
    if isinstance(exc, errors.GatedRepoError):
        return ModelNotFoundError(
            f"{name}: access is gated; accept its license on huggingface.co/{name}, then log in "
            "('hf auth login') or set HF_TOKEN"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelNotFoundError(f"{name}: no such model on the Hub (if it is private, set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelNotFoundError(f"{name}: revision '{ref.revision}' not found")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return ModelNotFoundError(
            f"{name}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline mode or no network); download it once online, or pass a local folder"
        )
    if isinstance(exc, errors.EntryNotFoundError):
        return ModelNotFoundError(f"{name}: the repository has no config.json; is it a model repository?")
    if isinstance(exc, errors.HfHubHTTPError):
        return ModelNotFoundError(f"{name}: the Hub answered with an error ({str(exc).splitlines()[0]})")
    if isinstance(exc, (errors.OfflineModeIsEnabled, ConnectionError, OSError, TimeoutError)):
        return ModelNotFoundError(
            f"{name}: the Hub cannot be reached (offline mode or no network) and the local cache "
            "does not hold what this needs; run it once online, or pass a local folder"
        )
    return ModelNotFoundError(f"{name}: cannot reach the Hub ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")


def hub_file(ref: ModelRef, filename: str, missing_ok: bool = False) -> Path | None:
    """Download (or find in the cache) one file of a Hub repository; None when missing_ok and the
    repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    prepare_hub()
    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision))
    except Exception as exc:  # huggingface_hub's errors, requests' and OSError alike
        # LocalEntryNotFoundError (not cached, offline) is an EntryNotFoundError too: not "missing".
        if missing_ok and isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
            return None
        raise _hub_error(ref, exc) from None


def cached_folder(ref: ModelRef) -> Path | None:
    """The local cache's snapshot of a Hub model when it holds config.json and the safetensors
    weights (what `resolve` downloads); None otherwise. Touches no network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=WANTED_FILES,
                                        local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a cache it cannot read
        return None
    from .checkpoint import Checkpoint
    from .errors import CheckpointError

    if not (folder / "config.json").is_file():
        return None
    try:
        Checkpoint(folder)
    except CheckpointError:
        return None
    return folder


def resolve(ref_text: str, check_config: Callable[[dict, str], None] | None = None) -> ModelRef:
    """Return the reference with a local folder (or file) path, downloading from the Hub if needed.

    check_config(config, source) runs on config.json before any weight is downloaded, so an
    unsupported family fails fast and cheaply.
    """
    ref = parse(ref_text)
    if not ref.is_hub:
        return ref
    config_path = hub_file(ref, "config.json")
    if check_config is not None:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LmtoolError(f"{ref.repo_id}: config.json is not valid JSON") from None
        check_config(config, f"{ref.repo_id}/config.json")
    from huggingface_hub import snapshot_download

    prepare_hub()
    try:
        folder = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=WANTED_FILES)
    except Exception as exc:
        raise _hub_error(ref, exc) from None
    ref.path = Path(folder)
    if not any(ref.path.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{ref.repo_id}: the repository has no safetensors weights (only other formats); "
            "lmtool reads safetensors"
        )
    return ref


def cache_folder() -> Path:
    """huggingface_hub's cache folder, found as huggingface_hub finds it (without importing it)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache.expanduser() / "huggingface" / "hub"


def cached_model_ids() -> list[str]:
    """The Hub model ids the local cache holds something of (`models--org--name` folders), sorted;
    shell completion lists them on every TAB, so this reads one directory and nothing else."""
    try:
        entries = os.listdir(cache_folder())
    except OSError:
        return []
    return sorted(e[len("models--"):].replace("--", "/", 1) for e in entries if e.startswith("models--"))
