"""Hub references resolved through huggingface_hub's cache layout, offline, and their errors."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace
from pathlib import Path

import pytest
from huggingface_hub import constants, errors
from transformers import GemmaForCausalLM

import lmtool
from lmtool import hub
from lmtool.errors import ModelNotFoundError, UnsupportedError

from helpers import gemma_style_tokenizer, randomize, save_hf, tiny_gemma_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo_id: str, files: Path, revision_name: str = "main") -> Path:
    """Lay files out as huggingface_hub's cache does: refs/<name> -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / revision_name).write_text(COMMIT)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folder


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return save_hf(randomize(GemmaForCausalLM(tiny_gemma_config())), tmp_path_factory.mktemp("m"), gemma_style_tokenizer())


def test_hub_id_loads_from_the_cache_offline(cache, tiny_files):
    snapshot = put_in_cache(cache, "acme/tiny-gemma", tiny_files)
    lm = lmtool.load("acme/tiny-gemma")
    assert lm.path == snapshot
    assert lm.tokenizer is not None and lm.family.model_type == "gemma"


def test_revision_suffix_selects_a_ref(cache, tiny_files):
    put_in_cache(cache, "acme/tiny-gemma", tiny_files, revision_name="v1")
    assert lmtool.load("acme/tiny-gemma@v1").path.name == COMMIT
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        lmtool.load("acme/tiny-gemma")  # no 'main' ref in the cache


def test_missing_model_offline_says_what_to_do(cache):
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*pass a local folder"):
        lmtool.load("acme/never-downloaded")


def test_unsupported_family_fails_before_any_weight(cache, tmp_path):
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"model_type": "llama"}))
    put_in_cache(cache, "acme/llama", only_config)
    with pytest.raises(UnsupportedError, match="acme/llama/config.json: model_type 'llama' is not supported"):
        lmtool.load("acme/llama")


@pytest.mark.parametrize("error, message", [
    (errors.GatedRepoError, "gated; accept its license"),
    (errors.RepositoryNotFoundError, "no such model on the Hub"),
    (errors.RevisionNotFoundError, "revision 'v9' not found"),
])
def test_hub_errors_become_one_line(monkeypatch, error, message):
    response = SimpleNamespace(headers={}, request=None, status_code=404)

    def fail(*args, **kwargs):
        raise error("multi-line\nserver text", response=response)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fail)
    with pytest.raises(ModelNotFoundError, match=message) as info:
        hub.resolve("acme/model@v9")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["./missing-folder", "/abs/missing", "weights.safetensors", "a/b/c"])
def test_local_looking_references_are_not_sent_to_the_hub(text):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        hub.parse(text)


def test_inspect_hub_reads_config_and_headers_only(cache, tiny_files, monkeypatch):
    """No weight is downloaded: the tensor list comes from the safetensors headers."""
    from lmtool.checkpoint import Checkpoint
    from lmtool.inspect import inspect

    only_config = tiny_files.parent / "config-only"
    only_config.mkdir(exist_ok=True)
    shutil.copy(tiny_files / "config.json", only_config / "config.json")
    put_in_cache(cache, "acme/tiny-gemma", only_config)
    local = Checkpoint(tiny_files)
    headers = {info.name: SimpleNamespace(dtype="F32", shape=list(info.shape)) for info in local.infos()}
    calls = []

    def fake_metadata(repo_id, revision=None):
        calls.append((repo_id, revision))
        return SimpleNamespace(files_metadata={"model.safetensors": SimpleNamespace(tensors=headers)})

    monkeypatch.setattr("huggingface_hub.get_safetensors_metadata", fake_metadata)
    result = inspect("acme/tiny-gemma", with_tensors=True)
    assert calls == [("acme/tiny-gemma", None)]
    assert result["family"] == "gemma" and result["format"] == "hub"
    assert result["parameters"] == sum(i.numel for i in local.infos())


def test_family_from_architectures_when_model_type_is_missing():
    from lmtool.loading import family_of

    assert family_of({"architectures": ["BloomForCausalLM"]}, "config.json").model_type == "bloom"
    with pytest.raises(UnsupportedError, match="no 'model_type'"):
        family_of({"architectures": ["LlamaForCausalLM"]}, "config.json")


def test_inspect_of_a_cached_hub_id_needs_no_network(cache, tiny_files, monkeypatch):
    """HF_HUB_OFFLINE=1 inspect works from the cache, as generate does (issue 14, item 7)."""
    from lmtool.inspect import inspect

    put_in_cache(cache, "acme/tiny-gemma", tiny_files)

    def no_network(*args, **kwargs):
        raise AssertionError("inspect asked the Hub for what the cache holds")

    monkeypatch.setattr("huggingface_hub.get_safetensors_metadata", no_network)
    result = inspect("acme/tiny-gemma")
    assert result["format"] == "hub" and result["source"] == "acme/tiny-gemma"
    assert result["family"] == "gemma" and result["tokenizer"]["bos"] == 2


def test_offline_errors_name_neither_class_nor_url(monkeypatch):
    def fail(*args, **kwargs):
        raise errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/acme/x: offline mode")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fail)
    with pytest.raises(ModelNotFoundError, match="the Hub cannot be reached") as info:
        hub.resolve("acme/x")
    assert "https://" not in str(info.value) and "OfflineModeIsEnabled" not in str(info.value)


def test_unreachable_hub_without_hf_hub_offline_fails_fast_in_one_line(tmp_path):
    """No network and no HF_HUB_OFFLINE: one line and exit 3 within seconds, not half a minute of
    huggingface_hub's retries. The endpoint is a closed local port, so nothing leaves the machine."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    for command in (["inspect", "acme/never-downloaded"], ["generate", "acme/never-downloaded", "hi"]):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "lmtool", *command], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.count("\n") == 1 and "the Hub cannot be reached" in proc.stderr, proc.stderr
        assert time.monotonic() - started < 20


def test_convert_takes_a_hub_id(cache, tiny_files, tmp_path):
    import torch

    from lmtool.convert import ConvertOptions, convert

    put_in_cache(cache, "acme/tiny-gemma", tiny_files)
    summary = convert("acme/tiny-gemma", tmp_path / "bf16", options=ConvertOptions(dtype=torch.bfloat16))
    assert summary["format"] == "standard"
    assert lmtool.load(tmp_path / "bf16").dtype == torch.bfloat16


def test_reachability_goes_through_the_proxy_when_one_is_set(monkeypatch):
    """Behind a proxy the Hub host itself may be unreachable: the probe asks the proxy instead."""
    import socket

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    for name in (*hub.PROXY_VARIABLES[False], *hub.PROXY_VARIABLES[True]):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port
    assert not hub._hub_reachable(2.0)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{listening.getsockname()[1]}")
    assert hub._hub_reachable(2.0)
    listening.close()
