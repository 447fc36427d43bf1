"""How every lmtool command presents itself and takes its shared options.

Typer builds each command from its function's signature; the classes here add what every command
shares, so that the command modules stay thin:
- help that reads like a shell tool's (MODEL, N, FILE, [auto|float32|...]; `-h`; examples),
- the options every command takes after its name: --recipe, --print-config, --quiet, --debug,
- recipes applied with the precedence of lmtool.settings, and --print-config showing each value's
  source without loading weights,
- the commands listed in the order people use them, with whole descriptions.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .. import recipes, settings
from ..errors import LmtoolError
from .common import out, settings as run_settings

COMMAND_ORDER = ("generate", "classify", "tag", "qa", "inspect", "convert", "quantize", "bench", "recipes", "completion")
# Commands that run no model take no recipe.
WITHOUT_RECIPE = ("recipes", "completion")

# Options and arguments that name files (read or written) or any path; they read FILE / PATH in
# help and complete local paths.
FILE_PARAMS = {"prompts_file", "files_from", "jsonl", "output", "context_file", "config"}
PATH_PARAMS = {"src", "out", "tokenizer", "cache_dir", "inputs"}

EXAMPLES = {
    "generate": [
        'lmtool generate lmtool/demo/zen-gemma "Beautiful is" --temperature 0',
        'echo "Flat is" | lmtool generate lmtool/demo/zen-gemma - -n 12 --stop "."',
        'lmtool generate --recipe gemma-2b-it "Write a haiku about shells" --print-config',
    ],
    "classify": ['lmtool classify MODEL "I loved it" "Never again." --top-k 2'],
    "tag": [
        'echo "Sarah works for Acme in Berlin." | lmtool tag MODEL --json',
        "find docs -name '*.txt' | lmtool tag MODEL --files-from - -o tags.jsonl --resume",
    ],
    "qa": ['lmtool qa MODEL --question "Where does Sarah work?" --context-file report.txt --top-k 3'],
    "inspect": ["lmtool inspect lmtool/demo/zen-gemma", "lmtool inspect google/gemma-2b --json"],
    "convert": [
        "lmtool convert lmtool/demo/zen-gemma /tmp/zen-bf16 --dtype bf16 --force",
        "lmtool convert --recipe gemma-2b gemma-2b.ckpt gemma-2b-hf --tokenizer tokenizer.model",
    ],
    "bench": ["lmtool bench lmtool/demo/zen-gemma --prompt-len 16,64 --batch 1,4 --repeat 2"],
    "quantize": ["lmtool quantize lmtool/demo/zen-gemma /tmp/zen-int8 --scheme int8"],
    "recipes": ["lmtool recipes", "lmtool recipes --family gemma"],
    "completion": ["lmtool completion bash > ~/.local/share/bash-completion/completions/lmtool"],
}


# --quiet and --debug go before the command (lmtool's own options) or after it (every command's).
QUIET_HELP = "No progress or informational messages on stderr."
DEBUG_HELP = "Show a traceback on errors."


def _shared_options(
    recipe: Optional[str] = typer.Option(
        None, "--recipe", metavar="NAME|FILE", help="Take settings from a recipe (`lmtool recipes` lists them)."
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the settings this run would use and where each comes from; load nothing."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Options every command takes (typer builds them from this signature)."""


def _build_shared_params() -> list:
    holder = typer.Typer(add_completion=False)
    holder.command()(_shared_options)
    return typer.main.get_command(holder).params


SHARED_PARAMS = _build_shared_params()
SHARED_NAMES = {p.name for p in SHARED_PARAMS}


def _value_type(param: Any) -> Any:
    """The type of one value of a parameter: int for Optional[int] and list[int] alike."""
    annotation = param.type_descriptor.annotation
    while typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if not args:
            break
        annotation = args[0]
    return annotation


def value_name(param: Any) -> str:
    """How help names the value of an option: FILE, PATH, N, NUMBER or TEXT."""
    if param.name in FILE_PARAMS:
        return "FILE"
    if param.name in PATH_PARAMS:
        return "PATH"
    annotation = _value_type(param)
    if annotation is bool:
        return ""
    if annotation is int:
        return "N"
    if annotation is float:
        return "NUMBER"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "PATH"
    return "TEXT"


NUMBER = r"(-?[\d.]+)"


def readable_range(help_text: str) -> str:
    """typer's bounds (`x>=1`, `0<=x<=1`) in words: `at least 1`, `0 to 1`."""
    help_text = re.sub(rf"{NUMBER}<=x<={NUMBER}", r"\1 to \2", help_text)
    help_text = re.sub(rf"\bx>={NUMBER}", r"at least \1", help_text)
    return re.sub(rf"\bx<={NUMBER}", r"at most \1", help_text)


def first_paragraph(text: str | None) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join((text or "").strip().split("\n\n")[0].split())


def argument_name(param: Any) -> str:
    name = param.metavar or param.name.upper()
    return name + "..." if param.nargs != 1 else name


class LmtoolCommand(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        shared = [p for p in SHARED_PARAMS if self.name not in WITHOUT_RECIPE or p.name not in ("recipe", "print_config")]
        self.params.extend(shared)
        for param in self.params:
            if param.param_type_name == "option" and param.metavar is None and not param.is_flag:
                param.metavar = value_name(param)
            elif param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()  # also in errors: "Missing argument 'MODEL'"
        if self.epilog is None and self.name in EXAMPLES:
            self.epilog = "Examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[self.name])

    # --- help -------------------------------------------------------------------------------------

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                arguments.append((argument_name(param), (param.help or "") + ("  [required]" if param.required else "")))
            elif param.param_type_name == "option":
                record = param.get_help_record(ctx)
                if record is not None:
                    options.append((record[0], readable_range(record[1])))
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        # Examples keep their line breaks (click would rewrap them into one paragraph).
        if self.epilog:
            formatter.write_paragraph()
            for line in self.epilog.splitlines():
                formatter.write_text(line) if not line.startswith("  ") else formatter.write(f"{line}\n")

    # --- recipes and shared options ------------------------------------------------------------

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        recipe = None
        if self.name not in WITHOUT_RECIPE and not any(a in ctx.help_option_names for a in args):
            ref = _option_value(args, "--recipe")
            if ref is not None:
                recipe = recipes.load(ref)
                check_recipe(recipe, self)
                # A checkpoint recipe names the model: it comes first, the user gives the rest.
                if recipe.model and any(p.name == "model" for p in self.params):
                    args = [recipe.model, *args]
                # A required option the recipe gives is not missing (its value is applied in invoke).
                required = {p.name for p in self.params if p.required and p.param_type_name == "option"}
                given = {k: v for k, v in recipe_options(recipe, self).items() if k in required}
                if given:
                    ctx.default_map = {**(ctx.default_map or {}), **given}
        ctx.meta["lmtool.recipe"] = recipe
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        shared = {name: ctx.params.pop(name) for name in SHARED_NAMES if name in ctx.params}
        run_settings.quiet = run_settings.quiet or shared.get("quiet", False)
        run_settings.debug = run_settings.debug or shared.get("debug", False)
        recipe = ctx.meta.get("lmtool.recipe")
        if shared.get("print_config"):
            print_config(self, ctx, recipe)
            return None
        merged = merged_settings(self, ctx, recipe)
        ctx.params.update({name: setting.value for name, setting in merged.items()})
        return super().invoke(ctx)


def _option_value(args: list[str], option: str) -> str | None:
    """The value given to `option` in args (before any `--`), or None."""
    for index, arg in enumerate(args):
        if arg == "--":
            return None
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _option_for(command: LmtoolCommand, key: str) -> Any | None:
    """The option a recipe key names: `max_new_tokens`, or `json` for --json (name as_json)."""
    flag = "--" + key.replace("_", "-")
    for param in command.params:
        if param.param_type_name == "option" and param.name not in SHARED_NAMES and (flag in param.opts or param.name == key):
            return param
    return None


def recipe_options(recipe: recipes.Recipe, command: LmtoolCommand) -> dict[str, Any]:
    """The recipe's option values for this command, by parameter name (raw, as written)."""
    values = {}
    if recipe.original.get("format") and _option_for(command, "from"):
        values[_option_for(command, "from").name] = recipe.original["format"]
    for key, value in recipe.options.items():
        param = _option_for(command, key)
        if param is not None:
            values[param.name] = value
    return values


def check_recipe(recipe: recipes.Recipe, command: LmtoolCommand) -> None:
    """A job recipe is for its own command only, and every option it sets must be one of that
    command's; a checkpoint recipe's options need only exist on some command (dtype serves them
    all, temperature only generate)."""
    if recipe.command is not None and recipe.command != command.name:
        raise recipe.error("command", f"this recipe is for `lmtool {recipe.command}`, not `lmtool {command.name}`")
    group = _group_of(command)
    candidates = [command] if recipe.command else [c for c in group.commands.values() if isinstance(c, LmtoolCommand)]
    for key in recipe.options:
        if not any(_option_for(c, key) is not None for c in candidates):
            where = f"`lmtool {recipe.command}`" if recipe.command else "any lmtool command"
            raise recipe.error(f"options.{key}", f"no such option of {where}")


def _group_of(command: LmtoolCommand) -> Any:
    from . import build

    return build()


def _coerce(param: Any, ctx: Any, value: Any, recipe: recipes.Recipe) -> Any:
    key = f"options.{param.opts[0].lstrip('-')}"
    wants_bool = _value_type(param) is bool
    if isinstance(value, bool) != wants_bool:
        raise recipe.error(key, f"expected {'true or false' if wants_bool else 'a value'}, got {value!r}")
    raw = [str(v) for v in value] if isinstance(value, list) else value if isinstance(value, bool) else str(value)
    if param.multiple and not isinstance(raw, list):
        raw = [raw]
    try:
        return param.process_value(ctx, raw)
    except Exception as exc:  # typer's BadParameter and coercion errors alike
        message = getattr(exc, "message", None) or str(exc)
        raise recipe.error(key, message.splitlines()[0]) from None


def merged_settings(
    command: LmtoolCommand, ctx: Any, recipe: recipes.Recipe | None, with_checkpoint: bool = False
) -> dict[str, settings.Setting]:
    """Every parameter of the run: command line, then recipe, then (generate, with_checkpoint) the
    checkpoint's generation_config.json, then the default (lmtool.settings.resolve)."""
    given = {"COMMANDLINE", "ENVIRONMENT", "PROMPT"}  # click's ParameterSource names (its module is private)
    command_line, defaults = {}, {}
    for name in (p.name for p in command.params if p.name in ctx.params):  # in the order of --help
        given_here = getattr(ctx.get_parameter_source(name), "name", None) in given
        if given_here:
            command_line[name] = ctx.params[name]
        defaults[name] = None if given_here else ctx.params[name]
    from_recipe = {}
    if recipe is not None:
        params = {p.name: p for p in command.params}
        from_recipe = {name: _coerce(params[name], ctx, value, recipe) for name, value in recipe_options(recipe, command).items()}
        if recipe.model and "model" in ctx.params:
            # The model argument came from the recipe (parse_args put it first).
            command_line.pop("model", None)
            from_recipe["model"] = recipe.model
    checkpoint = {}
    if with_checkpoint and "model" in ctx.params and any(k in ctx.params for k in settings.GENERATION_DEFAULTS):
        for name, default in settings.GENERATION_DEFAULTS.items():
            if defaults.get(name) is None:
                defaults[name] = default
        model = from_recipe.get("model") or command_line.get("model")
        checkpoint = settings.checkpoint_generation_settings(_generation_config(model))
    return settings.resolve(command_line, defaults, from_recipe, recipe.source if recipe else "recipe", checkpoint)


def _generation_config(model: str | None) -> dict:
    """A checkpoint's generation_config.json (fetched alone for a Hub id; no weights), or {}."""
    import json

    from .. import hub
    from .common import info

    if not model:
        return {}
    try:
        ref = hub.parse(model)
        if ref.is_hub:
            path = hub.hub_file(ref, "generation_config.json", missing_ok=True)
        else:
            path = ref.path / "generation_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}
    except (LmtoolError, OSError, ValueError) as exc:
        info(f"[dim]{model}: generation_config.json not read ({str(exc).splitlines()[0]})[/dim]")
        return {}


def print_config(command: LmtoolCommand, ctx: Any, recipe: recipes.Recipe | None) -> None:
    merged = merged_settings(command, ctx, recipe, with_checkpoint=True)
    options = {p.name: p for p in command.params}
    rows = []
    for name, setting in merged.items():
        param = options.get(name)
        label = argument_name(param) if param is not None and param.param_type_name == "argument" else (
            param.opts[0].lstrip("-") if param is not None else name)
        value = setting.value
        shown = "" if value is None else ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        rows.append((label, shown, setting.source))
    width = max(len(r[0]) for r in rows)
    value_width = min(40, max(len(r[1]) for r in rows))
    if recipe is not None:
        out(f"# recipe {recipe.name}: {recipe.path}")
    for label, shown, source in rows:
        out(f"{label:<{width}}  {shown:<{value_width}}  # {source}")


class LmtoolGroup(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(self.commands, key=lambda name: (rank.get(name, len(rank)), name))

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.commands[name]
            if not command.hidden:
                rows.append((name, first_paragraph(command.help)))  # whole, not click's 45-character cut
        with formatter.section("Commands"):
            formatter.write_dl(rows)
