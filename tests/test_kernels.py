"""The kernel layer's choices (lmtool.kernels): which instruction set runs, how LMTOOL_ISA and
LMTOOL_NATIVE change it, and what a failed build says. The kernels' arithmetic is tested in
test_inference.py (every ISA this CPU runs) and test_neon.py (NEON under emulation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmtool
from lmtool import kernels

from helpers import run_cli

DEMO = str(Path(lmtool.__file__).parent / "demo" / "zen-gemma")


@pytest.fixture
def env():
    """Sets LMTOOL_* variables and has the kernel layer read them again, then restores both."""
    with pytest.MonkeyPatch.context() as patch:

        def setenv(**variables):
            for name, value in variables.items():
                if value is None:
                    patch.delenv(name, raising=False)
                else:
                    patch.setenv(name, value)
            kernels.refresh()

        yield setenv
    kernels.refresh()


@pytest.fixture
def fresh(monkeypatch):
    """Reports not yet given in this process, and builds not yet loaded (restored after)."""
    monkeypatch.setattr(kernels, "_reported", set())
    kernels.library_for.cache_clear()
    kernels.capped_isa.cache_clear()
    kernels.refresh()
    yield
    kernels.library_for.cache_clear()
    kernels.capped_isa.cache_clear()
    kernels.refresh()


def test_the_best_isa_the_cpu_has_is_chosen_and_lmtool_isa_caps_it(monkeypatch, capsys):
    monkeypatch.delenv("LMTOOL_ISA", raising=False)
    best = kernels.cpu_isa()
    here = [isa for isa in kernels.ISAS if kernels.runs_here(isa)]
    assert best is here[0] and here[-1].name == "portable"
    for isa in here:
        monkeypatch.setenv("LMTOOL_ISA", isa.name)
        assert kernels.cpu_isa() is isa
    monkeypatch.setenv("LMTOOL_ISA", "portable")
    assert not kernels.fast_bf16_matmul()  # below avx512/neon-bf16, as such a CPU would be
    assert capsys.readouterr().err == ""


def test_lmtool_isa_unknown_or_missing_from_the_cpu_is_reported_once_and_ignored(monkeypatch, capsys, fresh):
    monkeypatch.delenv("LMTOOL_ISA", raising=False)
    best = kernels.cpu_isa()
    lacking = next((isa for isa in kernels.ISAS if not kernels.runs_here(isa)), None)
    monkeypatch.setenv("LMTOOL_ISA", "sse9")
    assert kernels.cpu_isa() is best and kernels.cpu_isa() is best
    err = capsys.readouterr().err
    assert err.count("lmtool: LMTOOL_ISA=sse9 is not one of avx512, avx2, neon-bf16, neon, portable; ignored") == 1
    if lacking is not None:
        monkeypatch.setenv("LMTOOL_ISA", lacking.name)
        assert kernels.cpu_isa() is best
        assert f"LMTOOL_ISA={lacking.name}: this CPU lacks it; using {best.name}" in capsys.readouterr().err


def test_lmtool_native_0_turns_the_kernels_off(env):
    env(LMTOOL_NATIVE="0")
    assert not kernels.available() and kernels.active_isa() is None
    assert kernels.describe()["kernels"] is None and kernels.describe()["kernels_off"] == "LMTOOL_NATIVE=0"


def test_a_failed_build_is_reported_once_with_the_compilers_first_error(env, monkeypatch, tmp_path, capsys, fresh):
    if kernels.compiler() is None:
        pytest.skip("no C compiler")
    env(XDG_CACHE_HOME=str(tmp_path), LMTOOL_ISA="portable", LMTOOL_NATIVE=None)
    sources = kernels.package_sources(kernels.BY_NAME["portable"])
    broken = {**sources, "portable.c": '#include "common.h"\nthis is not C;\n'}
    monkeypatch.setattr(kernels, "package_sources", lambda isa: broken)
    for _ in range(3):
        assert not kernels.available()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lmtool: the portable kernels did not build with ")
    assert ": portable.c:2:" in lines[0] and "error" in lines[0]
    assert not list((tmp_path / "lmtool" / "kernels").glob("*.so"))  # nothing half-built left behind


def test_a_failed_build_falls_back_to_the_next_instruction_set(env, monkeypatch, tmp_path, capsys, fresh):
    chosen = kernels.cpu_isa()
    if kernels.compiler() is None or chosen.name == "portable":
        pytest.skip("needs a C compiler and an instruction set above portable")
    env(XDG_CACHE_HOME=str(tmp_path), LMTOOL_NATIVE=None)
    sources = kernels.package_sources

    def broken_top(isa):
        files = sources(isa)
        return {**files, isa.source: "#error broken on purpose\n"} if isa is chosen else files

    monkeypatch.setattr(kernels, "package_sources", broken_top)
    below = next(isa for isa in kernels.ISAS[kernels.ISAS.index(chosen) + 1 :] if kernels.runs_here(isa))
    assert kernels.active_isa() is below and kernels.available()
    assert f"the {chosen.name} kernels did not build" in capsys.readouterr().err


def test_describe_names_the_kernels_and_the_cpu_features(env):
    env(LMTOOL_NATIVE=None, LMTOOL_ISA="portable")
    info = kernels.describe()
    if kernels.available():
        assert info["kernels"] == "portable" and info["kernels_off"] is None
    assert info["machine"] == kernels.machine()
    assert set(info["cpu_features"]) <= kernels.cpu_features()


def test_inspect_and_generate_verbose_show_the_backend_and_the_cpu_features(capsys, env):
    env(LMTOOL_ISA="portable", LMTOOL_NATIVE=None)
    active = "kernels (portable)" if kernels.available() else "oneDNN"
    code, out, err = run_cli(capsys, "inspect", DEMO, "--json")
    assert code == 0, err
    runtime = json.loads(out)["runtime"]
    assert runtime["backend"]["float32"] == active and runtime["isa_cap"] == "portable"
    assert runtime["cpu_features"] == kernels.relevant_features()
    code, out, err = run_cli(capsys, "inspect", DEMO)
    assert "kernels: " in out and f"CPU {kernels.machine()}" in out
    code, out, err = run_cli(capsys, "generate", DEMO, "Beautiful is", "--temperature", "0", "-n", "2", "--verbose")
    assert code == 0, err
    assert f"linear layers (float32 on cpu): {active}" in err
    assert "(LMTOOL_ISA=portable)" in err and "linear layers" not in out
