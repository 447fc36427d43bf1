"""The shell experience: help and completion start without torch, read like a shell tool's, and the
checked-in completion scripts are current and complete what they should in bash, zsh and fish."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli
from lmtool import choices
from lmtool.cli.completion import SCRIPTS, SHELLS

ROOT = Path(__file__).resolve().parent.parent
COMPLETIONS = ROOT / "completions"
HEAVY = ("torch", "numpy", "lmtool.loading", "lmtool.registry", "transformers")


def _lmtool_imports(*args: str) -> list[str]:
    """Run the console script's entry in a fresh interpreter; the heavy modules it imported."""
    probe = (
        "import sys\n"
        f"sys.argv = ['lmtool', *{list(args)!r}]\n"
        "from lmtool.launcher import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('\\n'.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    return [line for line in done.stderr.splitlines() if line in HEAVY]


@pytest.mark.parametrize(
    "args",
    [["--help"], ["-h"], ["--version"], ["generate", "--help"], ["tag", "-h"], ["convert", "--help"],
     ["bench", "--help"], ["inspect", "--help"], ["completion", "bash"], ["__complete", "models"],
     ["recipes"], ["generate", "--recipe", "gemma-2b", "hi", "--print-config"]],
)
def test_help_version_and_completion_import_no_torch(args):
    assert _lmtool_imports(*args) == []


def test_registry_config_recipes_and_settings_import_no_torch():
    probe = ("import sys, lmtool.registry, lmtool.config, lmtool.recipes, lmtool.settings, lmtool.hub, lmtool.cli\n"
             "print([m for m in ('torch', 'numpy', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


def test_help_reads_like_a_shell_tool(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    section = out.split("Commands:\n")[1].split("\n\n")[0]
    listed = [line.split()[0] for line in section.splitlines() if line[2] != " "]
    assert listed[:6] == ["generate", "classify", "tag", "qa", "inspect", "convert"]
    assert "..." not in section  # whole descriptions, not click's cut
    for command in listed:
        code, out, _ = run_cli(capsys, command, "-h")
        assert code == 0 and out.startswith(f"Usage: lmtool {command} ")
        for python_ism in ("<str>", "<int", "<float>", "list[", "{model}", "<Path>", "<path>", "x>=", "<=x"):
            assert python_ism not in out, (command, python_ism)
        assert "--quiet" in out and "--debug" in out
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert "MODEL [PROMPT]" in out and "Examples:" in out
    assert "[auto|float32|bfloat16|float16]" in out and "[auto|cpu|cuda|cuda:N]" in out
    assert "Tokens to generate at most." in out and "--temp" in out and "--max-tokens" in out


@pytest.mark.parametrize(
    "args",
    [["generate", "M", "--dtype", "fp64"], ["generate", "M", "--device", "mps"], ["tag", "M", "--aggregation", "x"],
     ["convert", "a", "b", "--from", "gguf"], ["bench", "--preset", "gemma-2b", "--dtype", "float32,int8"],
     ["recipes", "--family", "llama"]],
)
def test_unknown_choice_is_a_usage_error(capsys, args):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == "" and "is not one of" in err


def test_aliases_and_global_flags_after_the_command(capsys, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    code, out, err = run_cli(capsys, "generate", str(model), "hi", "--temp", "0.5", "--max-tokens", "9",
                             "--dtype", "bf16", "--quiet", "--debug", "--print-config")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["temperature"][1:] == ["0.5", "#", "command", "line"]
    assert rows["max-new-tokens"][1] == "9" and rows["dtype"][1] == "bfloat16"


def test_checked_in_completions_are_current():
    for shell in SHELLS:
        path = COMPLETIONS / f"lmtool.{shell}"
        assert path.read_text() == SCRIPTS[shell](), f"{path} is stale: run `lmtool completion {shell} > {path}`"


def test_domain_values_are_the_librarys():
    from lmtool import loading, quantize
    from lmtool.registry import families
    from lmtool.tasks.tag import STRATEGIES

    known = families()
    assert set(known) == set(choices.FAMILIES)
    formats = {name for family in known.values() for name in family.converters} | {"standard"}
    assert formats == set(choices.CONVERT_FORMATS)
    assert tuple(loading.DTYPES) == choices.DTYPES
    assert tuple(quantize.SCHEMES) == choices.QUANT_SCHEMES and STRATEGIES == choices.AGGREGATIONS
    assert [p for family in known.values() for p in family.presets] == list(choices.BENCH_PRESETS)


@pytest.fixture
def shell_env(tmp_path):
    """PATH with this interpreter's lmtool first, a Hub cache holding one model, one user recipe."""
    cache = tmp_path / "hub"
    (cache / "models--acme--tiny-gemma" / "snapshots").mkdir(parents=True)
    (cache / "datasets--acme--corpus").mkdir()
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "my-tagger.yaml").write_text("description: mine\ncommand: tag\n")
    (tmp_path / "work" / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "work" / "notes.txt").write_text("x")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), LMTOOL_RECIPES=str(recipes), HOME=str(tmp_path))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env, tmp_path / "work"


# (words typed, with the last one being completed) -> candidates that must be offered / must not be.
CASES = [
    (["lmtool", ""], ["generate", "tag", "convert", "completion"], ["--dtype"]),
    (["lmtool", "ge"], ["generate"], ["tag"]),
    (["lmtool", "generate", "--dt"], ["--dtype"], ["--device"]),
    (["lmtool", "generate", "--dtype", ""], list(choices.DTYPE_CHOICES) + ["bf16"], ["notes.txt", "models"]),
    (["lmtool", "-q", "tag", "M", "x", "--device", ""], list(choices.DEVICE_CHOICES), []),
    (["lmtool", "tag", "M", "--aggregation", "f"], ["first"], ["max"]),
    (["lmtool", "tag", "M", "--aggregation", ""], list(choices.AGGREGATIONS), ["notes.txt"]),
    (["lmtool", "convert", "src", "--from", "bloom-"], ["bloom-megatron", "bloom-flax"], ["gemma-pytorch"]),
    (["lmtool", "quantize", "M", "OUT", "--scheme", ""], list(choices.QUANT_SCHEMES), []),
    (["lmtool", "recipes", "--family", ""], list(choices.FAMILIES), []),
    (["lmtool", "bench", "--preset", "zamba2-"], ["zamba2-1.2b", "zamba2-7b"], ["gemma-2b"]),
    (["lmtool", "generate", "--recipe", ""], ["gemma-2b-it", "zamba2-7b", "tag-files", "my-tagger"], []),
    (["lmtool", "generate", "acme/"], ["acme/tiny-gemma"], ["acme/corpus"]),
    (["lmtool", "inspect", "mod"], ["models"], []),
    (["lmtool", "tag", "M", "--files-from", "no"], ["notes.txt"], []),
    (["lmtool", "generate", "M", "--temperature", ""], [], ["notes.txt"]),
    (["lmtool", "completion", ""], list(SHELLS), []),
]


def _check(candidates: list[str], want: list[str], unwanted: list[str], words: list[str]) -> None:
    stripped = [c.rstrip("/") for c in candidates]
    for item in want:
        assert item in stripped, (words, item, candidates)
    for item in unwanted:
        assert item not in stripped, (words, item, candidates)


def test_bash_completes(shell_env):
    env, work = shell_env
    script = "\n".join(
        [f"source {COMPLETIONS / 'lmtool.bash'}",
         't() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _lmtool; '
         'printf "%s\\n" "${COMPREPLY[@]}"; echo "=="; }']
        + ["t " + " ".join(f"'{w}'" for w in words) for words, _, _ in CASES]
    )
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True, env=env,
                          cwd=work, timeout=120)
    assert done.returncode == 0, done.stderr
    outputs = done.stdout.split("==\n")
    for (words, want, unwanted), output in zip(CASES, outputs):
        _check(output.split("\n"), want, unwanted, words)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes(shell_env):
    # zsh's completion builtins work only inside a completion widget: stand-ins print what the
    # function offers, and the function runs on `words`/CURRENT as zsh would set them.
    env, work = shell_env
    script = "\n".join(
        ["compadd() { local a; for a in \"$@\"; do [[ $a == -- ]] && continue; print -r -- $a; done }",
         "_files() { print -r -- *(N) }",
         "_describe() { local c; for c in ${(P)2}; do print -r -- ${c%%:*}; done }",
         "compset() { : }",
         "compdef() { : }",
         f"source {COMPLETIONS / 'lmtool.zsh'}",
         't() { words=("$@"); CURRENT=${#words}; _lmtool; print "=="; }']
        + ["t " + " ".join(f"'{w}'" for w in words) for words, _, _ in CASES]
    )
    done = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert done.returncode == 0, done.stderr
    # Installed as _lmtool on $fpath, compinit binds it to lmtool (its #compdef line).
    folder = work.parent / "zfunc"
    folder.mkdir()
    shutil.copy(COMPLETIONS / "lmtool.zsh", folder / "_lmtool")
    bound = subprocess.run(
        ["zsh", "-f", "-c", f"fpath=({folder} $fpath); autoload -Uz compinit; compinit -u -d {work.parent}/zcompdump; "
                            "print -r -- ${_comps[lmtool]}"], capture_output=True, text=True, env=env, timeout=120)
    assert bound.stdout.strip() == "_lmtool", bound.stderr
    outputs = done.stdout.split("==\n")
    for (words, want, unwanted), output in zip(CASES, outputs):
        # The stand-in _files lists the folder, unfiltered: zsh filters by prefix itself.
        offered = [w for line in output.split("\n") for w in line.split(" ") if w.startswith(words[-1].split("=")[-1])]
        _check(offered, want, unwanted, words)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes(shell_env):
    env, work = shell_env
    script = "; ".join(
        [f"source {COMPLETIONS / 'lmtool.fish'}"]
        + [f"complete -C {_fish_words(words)}; echo ==" for words, _, _ in CASES]
    )
    done = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, text=True, env=env, cwd=work,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    outputs = done.stdout.split("==\n")
    for (words, want, unwanted), output in zip(CASES, outputs):
        _check([line.split("\t")[0] for line in output.split("\n")], want, unwanted, words)


def _fish_words(words: list[str]) -> str:
    line = " ".join(words)
    return "'" + line.replace("'", "\\'") + "'"
