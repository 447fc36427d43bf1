"""Recipes: every shipped one is valid for its commands; the precedence command line > recipe >
generation_config.json > default, shown by --print-config without loading weights; bad recipes are
one-line errors naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from lmtool import choices, recipes, settings
from lmtool.cli import build

DEMO = str(Path(__file__).resolve().parent.parent / "lmtool" / "demo" / "zen-gemma")
RELEASED = {
    "gemma": ["gemma-2b", "gemma-2b-it", "gemma-7b", "gemma-7b-it"],
    "bloom": ["bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1"],
    "recurrent_gemma": ["recurrentgemma-2b", "recurrentgemma-2b-it", "recurrentgemma-9b", "recurrentgemma-9b-it"],
    "zamba2": ["zamba2-1.2b", "zamba2-1.2b-instruct", "zamba2-2.7b", "zamba2-2.7b-instruct", "zamba2-7b",
               "zamba2-7b-instruct"],
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """--print-config fetches a Hub model's generation_config.json: never from here."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def print_config(capsys, *args: str) -> dict[str, tuple[str, str]]:
    """--print-config's rows: label -> (value, source)."""
    code, out, err = run_cli(capsys, *args, "--print-config")
    assert code == 0, err
    rows = {}
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        body, _, source = line.partition("  # ")
        label, _, value = body.strip().partition(" ")
        rows[label] = (value.strip(), source)
    return rows


def test_released_models_of_every_family_have_recipes():
    for family, names in RELEASED.items():
        for name in names:
            recipe = recipes.load(name)
            assert recipe.family == family and recipe.kind == "checkpoint" and recipe.model
            assert recipe.options.get("dtype") == "bfloat16"
            assert recipe.options.get("chat", False) == name.endswith(("-it", "-instruct"))
            if family != "zamba2":
                assert recipe.original["format"] in choices.CONVERT_FORMATS and recipe.original["convert"]


@pytest.mark.parametrize("name", recipes.names())
def test_every_shipped_recipe_applies_to_its_commands(capsys, name):
    recipe = recipes.load(name)
    group = build()
    if recipe.kind == "job":
        if recipe.command not in group.commands:
            pytest.skip(f"`lmtool {recipe.command}` is not part of this build")
        args = {"tag": ["M"], "convert": ["SRC", "OUT"], "quantize": ["M", "OUT"], "bench": []}[recipe.command]
        rows = print_config(capsys, recipe.command, "--recipe", name, *args)
        for key in recipe.options:
            assert rows[key.replace("_", "-")][1] == f"recipe {name}", key
        return
    for command in ("generate", "inspect", "classify"):
        rows = print_config(capsys, command, "--recipe", name)
        assert rows["MODEL"] == (recipe.model, f"recipe {name}")
    assert print_config(capsys, "convert", "--recipe", name, "a", "b")["dtype"] == ("bfloat16", f"recipe {name}")


def test_precedence_command_line_recipe_checkpoint_default(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 7, "top_p": 0.8}))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"description: test\nmodel: {model}\noptions:\n  temperature: 0.9\n  top-p: 0.5\n  seed: 3\n")
    rows = print_config(capsys, "generate", "--recipe", str(recipe), "hi", "--top-p", "0.3")
    assert rows["top-p"] == ("0.3", "command line")
    assert rows["temperature"] == ("0.9", "recipe mine") and rows["seed"] == ("3", "recipe mine")
    assert rows["top-k"] == ("7", "generation_config.json")
    assert rows["min-p"] == (str(settings.GENERATION_DEFAULTS["min_p"]), "default")
    assert rows["MODEL"] == (str(model), "recipe mine") and rows["PROMPT"] == ("hi", "command line")


def test_resolve_takes_each_setting_from_the_first_layer_that_has_it():
    merged = settings.resolve(
        command_line={"a": 1, "b": None}, defaults={"a": 0, "b": 0, "c": 0, "d": 0},
        recipe={"b": 2, "c": 2}, recipe_source="recipe r", checkpoint={"c": 3, "d": 3},
    )
    assert [(m.value, m.source) for m in merged.values()] == [
        (1, "command line"), (2, "recipe r"), (2, "recipe r"), (3, "generation_config.json")]
    assert settings.checkpoint_generation_settings({"do_sample": False, "top_k": 5}) == {"top_k": 5, "temperature": 0.0}


def test_recipe_lists_fill_repeatable_options(capsys, tmp_path):
    recipe = tmp_path / "lists.yaml"
    recipe.write_text("description: lists\ncommand: tag\noptions:\n  ignore: [O, MISC]\n  dtype: bf16\n")
    rows = print_config(capsys, "tag", "M", "--recipe", str(recipe))
    assert rows["ignore"] == ("O,MISC", "recipe lists") and rows["dtype"] == ("bfloat16", "recipe lists")


def test_a_recipe_run_equals_the_same_flags(capsys, tmp_path):
    recipe = tmp_path / "zen.yaml"
    recipe.write_text(f"description: zen\nmodel: {DEMO}\noptions:\n  temperature: 0\n  max-new-tokens: 6\n  dtype: fp32\n")
    with_recipe = run_cli(capsys, "generate", "--recipe", str(recipe), "Beautiful is", "-q")
    with_flags = run_cli(capsys, "generate", DEMO, "Beautiful is", "--temperature", "0", "-n", "6", "-q")
    assert with_recipe[0] == 0 and with_recipe[1] == with_flags[1] and with_recipe[1].strip()


@pytest.mark.parametrize(
    "text, key",
    [
        ("description: x\nmodel: a/b\nmodle: c/d\n", "modle: unknown key"),
        ("description: x\nmodel: [a, b]\n", "model: expected a string"),
        ("description: x\nmodel: a/b\noptions:\n  temprature: 0.5\n", "options.temprature: no such option"),
        ("description: x\nmodel: a/b\noptions:\n  temperature: hot\n", "options.temperature:"),
        ("description: x\nmodel: a/b\noptions:\n  chat: 3\n", "options.chat: expected true or false"),
        ("description: x\nmodel: a/b\nfamily: llama\n", "family: 'llama' is not one of"),
        ("description: x\ncommand: bench\n", "command: this recipe is for `lmtool bench`"),
        ("description: x\ncommand: generate\noptions:\n  scheme: int8\n", "options.scheme: no such option"),
        ("model: a/b\n", "description: missing"),
        ("description: x\nmodel: a/b\noriginal:\n  format: gguf\n", "original.format: 'gguf' is not one of"),
        ("description: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_a_bad_recipe_is_one_line_naming_file_and_key(capsys, tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run_cli(capsys, "generate", "--recipe", str(path), "hi")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {path}: ") and key in err


def test_missing_recipe(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--recipe", str(tmp_path / "none.yaml"), "hi")
    assert code == 1 and "none.yaml: no such recipe file" in err
    code, _, err = run_cli(capsys, "tag", "--recipe", "no-such-recipe", "M")
    assert code == 1 and "no-such-recipe: no such recipe (known: " in err


def test_recipes_lists_each_once(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(recipes.USER_DIR_VARIABLE, str(tmp_path))
    (tmp_path / "mine.yaml").write_text("description: my own tagging job\ncommand: tag\n")
    code, out, _ = run_cli(capsys, "recipes")
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and names == recipes.names() and "mine" in names
    assert "my own tagging job" in out
    code, out, _ = run_cli(capsys, "recipes", "--family", "bloom", "--json")
    assert [json.loads(line)["name"] for line in out.splitlines()] == sorted(RELEASED["bloom"])


def test_a_hub_model_without_generation_config_is_not_an_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from lmtool import hub
    from lmtool.errors import ModelNotFoundError

    def fail_with(error):
        def download(*args, **kwargs):
            raise error
        return download

    ref = hub.parse("acme/tiny")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail_with(EntryNotFoundError("404")))
    assert hub.hub_file(ref, "generation_config.json", missing_ok=True) is None
    # Not cached while offline is not "the repository has no such file".
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail_with(LocalEntryNotFoundError("offline")))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        hub.hub_file(ref, "generation_config.json", missing_ok=True)
