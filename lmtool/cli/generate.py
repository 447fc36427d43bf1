"""lmtool generate MODEL [PROMPT|-]"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer

from ..errors import Interrupted, LmtoolError
from ..settings import GENERATION_DEFAULTS, checkpoint_generation_settings, resolve
from . import app
from .common import device_option, dtype_option, info, open_lines, out, out_json, read_text_arg, threads_option


def read_prompts_file(path: str) -> list[dict]:
    from ..tasks.inputs import checked_text

    prompts = []
    for number, line in enumerate(open_lines(path), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise LmtoolError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise LmtoolError(f"{path}:{number}: needs a string field \"prompt\"")
        item["prompt"] = checked_text(item["prompt"], f"{path}:{number}")
        prompts.append(item)
    if not prompts:
        raise LmtoolError(f"{path}: no prompts")
    return prompts


def sampling_from(options: dict, generation_config: dict) -> SamplingParams:
    """Command-line (or recipe) values win; then the checkpoint's generation_config.json; then
    the built-in defaults (lmtool.settings holds that order)."""
    from ..generation import SamplingParams

    values = {name: setting.value for name, setting in resolve(
        options, GENERATION_DEFAULTS, checkpoint=checkpoint_generation_settings(generation_config)).items()}
    if values["temperature"] < 0:
        raise LmtoolError("--temperature must be >= 0")
    if not 0 < values["top_p"] <= 1:
        raise LmtoolError("--top-p must be in (0, 1]")
    if not 0 <= values["min_p"] < 1:
        raise LmtoolError("--min-p must be in [0, 1)")
    if values["repetition_penalty"] <= 0:
        raise LmtoolError("--repetition-penalty must be > 0")
    return SamplingParams(**values)


@app.command("generate")
def generate_command(
    model: str = typer.Argument(..., help="Local folder, or a Hub id with optional @revision."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' reads stdin."),
    prompts_file: Optional[str] = typer.Option(
        None, "--prompts-file", help="JSON Lines with a \"prompt\" field (and optional \"id\"); '-' is stdin."
    ),
    max_new_tokens: int = typer.Option(
        128, "--max-new-tokens", "--max-tokens", "-n", min=1, help="Tokens to generate at most."
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", "--temp", help="0 = greedy. Default: the model's, else 0.8."
    ),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="0 = off. Default: the model's, else 40."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="1 = off. Default: the model's, else 0.95."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="0 = off. Default: the model's, else 0.05."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="1 = off."),
    seed: Optional[int] = typer.Option(None, help="Random seed; one is chosen and reported when not given."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Always generate --max-new-tokens tokens."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat format."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per batch with --prompts-file."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout."),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="With --prompts-file: write the JSON Lines records here, in prompt order."
    ),
    resume: bool = typer.Option(False, "--resume", help="With --output: skip prompts whose records are in it."),
    force: bool = typer.Option(False, "--force", help="With --output: replace an existing file."),
    dtype: str = dtype_option(),
    device: str = device_option(),
    threads: Optional[int] = threads_option(),
    verbose: bool = typer.Option(
        False, "--verbose", help="Also report on stderr what runs the model: backend, instruction set, CPU features."
    ),
) -> None:
    """Generate text; a single prompt streams to stdout as it is produced."""
    from .. import distributed
    from ..generation import GenerationStats, context_window, generate, new_seed, tokens_within_window
    from ..loading import load, set_threads
    from ..tasks.inputs import checked_text

    if prompts_file is not None and prompt is not None:
        raise LmtoolError("give either PROMPT or --prompts-file, not both")
    world = distributed.detect()
    if output is not None and prompts_file is None:
        raise LmtoolError("--output needs --prompts-file")
    if resume and output is None:
        raise LmtoolError("--resume needs --output FILE")
    distributed.require_output(world, output)
    if prompts_file is not None:
        items = distributed.read_on_leader(world, prompts_file, read_prompts_file)
    else:
        if prompt is None:
            if sys.stdin.isatty():
                raise LmtoolError("no prompt: give PROMPT, '-' for stdin, or --prompts-file")
            prompt = "-"
        text = checked_text(read_text_arg(prompt, "PROMPT"), "stdin" if prompt == "-" else "PROMPT")
        # `echo "..." | lmtool generate M -` should not ask the model to continue a new line.
        items = [{"prompt": text[:-1] if prompt == "-" and text.endswith("\n") else text}]
    if system is not None and not chat:
        raise LmtoolError("--system needs --chat")
    if system is not None:
        system = checked_text(system, "--system")

    distributed.check_output(world, output, resume=resume, force=force)
    lm = load(model, task="causal-lm", dtype=dtype, device=distributed.rank_device(world, device))
    world.log(f"{lm.device}, {set_threads(distributed.threads_for(world, threads), lm.weight_bytes)} threads")
    window = context_window(lm.config)
    if verbose:
        from ..inference import runtime_summary

        for line in runtime_summary(lm.dtype, lm.device):
            info(line)
    if lm.tokenizer is None:
        raise LmtoolError(f"{model}: has no tokenizer (tokenizer.json or tokenizer.model)")
    tok = lm.tokenizer
    params = sampling_from(
        dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty),
        lm.generation_config,
    )
    # Every rank must draw from the same seed; each prompt of a file samples from seed + its position,
    # so its text does not depend on how the prompts were split among ranks or batches.
    seed = seed if seed is not None else distributed.on_leader(world, new_seed)
    if not params.greedy and world.leader:
        info(f"seed {seed}")
    eos_ids = list(dict.fromkeys(tok.eos_ids + _generation_eos(lm.generation_config)))
    if chat:
        # Instruction-tuned Gemma ends its turn with <end_of_turn> rather than <eos>.
        end_of_turn = tok.token_to_id("<end_of_turn>")
        if end_of_turn is not None:
            eos_ids.append(end_of_turn)

    def text_of(item: dict) -> str:
        if not chat:
            return item["prompt"]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": item["prompt"]}
        ]
        return tok.apply_chat(messages)

    stream = len(items) == 1 and not as_json and output is None

    def run_batches(positions: list[int], write) -> int:
        """Generate for items[positions]; records go to write(position, record) when given (-o).
        Returns how many prompts were done."""
        for start in range(0, len(positions), batch_size):
            batch_positions = positions[start : start + batch_size]
            batch = [items[position] for position in batch_positions]
            prompts = [tok.encode(text_of(item)) for item in batch]
            longest = max(range(len(prompts)), key=lambda row: len(prompts[row]))
            try:
                new_tokens = tokens_within_window(len(prompts[longest]), max_new_tokens, window)
            except LmtoolError as exc:
                which = f", prompt {batch_positions[longest] + 1}" if len(items) > 1 else ""
                raise LmtoolError(f"{model}{which}: {exc}") from None
            if new_tokens < max_new_tokens:
                info(f"stopping at the context window ({window} tokens): at most {new_tokens} new tokens")
            stats, started = GenerationStats(), time.perf_counter()
            try:
                completions, stats = generate(
                    lm.model,
                    prompts,
                    max_new_tokens=new_tokens,
                    params=params,
                    seed=[seed + position for position in batch_positions] if prompts_file else seed,
                    eos_ids=eos_ids,
                    pad_id=tok.pad_id if tok.pad_id is not None else 0,
                    tokenizer=tok,
                    stop=stop,
                    ignore_eos=ignore_eos,
                    on_text=(lambda row, delta: out(delta, end="")) if stream else None,
                    stats=stats,
                )
            except KeyboardInterrupt:
                # Typer would turn Ctrl-C into a bare exit code: end the line and say how far it got.
                if stream:
                    out()
                done_before = f"{start} of {len(items)} prompts done, then " if len(items) > 1 else ""
                decoding = time.perf_counter() - started - stats.prefill_s
                speed = f", {stats.new_tokens / decoding:.1f} tok/s" if stats.new_tokens and decoding > 0 else ""
                raise Interrupted(f"interrupted: {done_before}{stats.new_tokens} tokens generated{speed}") from None
            for index, (position, item, done) in enumerate(zip(batch_positions, batch, completions), start + 1):
                if as_json or write:
                    record = {"id": item["id"]} if "id" in item else {"id": position + 1} if write else {}
                    record.update(
                        prompt=item["prompt"],
                        text=done.text,
                        token_ids=done.token_ids,
                        finish_reason=done.finish_reason,
                        prompt_tokens=done.prompt_tokens,
                        completion_tokens=len(done.token_ids),
                        seed=seed + position if prompts_file else seed,
                        timings={
                            "prefill_s": round(stats.prefill_s, 4),
                            "decode_s": round(stats.decode_s, 4),
                            "first_token_s": round(stats.first_token_s, 4),
                            "decode_tokens_per_s": round(stats.new_tokens / stats.decode_s, 2)
                            if stats.decode_s
                            else None,
                        },
                    )
                    write(position, record) if write else out_json(record)
                elif stream:
                    out()
                else:
                    # Several plain-text completions: a header before each, as `head` marks files, so
                    # the output can be split (--json gives one object per prompt instead).
                    if index > 1:
                        out()
                    out(f"==> {item.get('id', index)} <==")
                    out(done.text)
            if stream and not as_json:
                tps = stats.new_tokens / stats.decode_s if stats.decode_s else 0.0
                info(f"[dim]{stats.new_tokens} tokens, {tps:.1f} tok/s, finish: {completions[0].finish_reason}[/dim]")
        return len(positions)

    if output is None:
        run_batches(list(range(len(items))), None)
        return
    keys = [str(item.get("id", position + 1)) for position, item in enumerate(items)]
    def rank_share(positions: list[int], write) -> int:
        done = run_batches(positions, write)
        world.log(f"generate: {done} prompts done")
        return done

    counts, skipped = distributed.sharded_run(world, output, keys, resume=resume, force=force, work=rank_share)
    if world.leader:
        already = f", {skipped} already in {output}" if skipped else ""
        info(f"generate: {sum(counts)} prompts done{already}")

def _generation_eos(generation_config: dict) -> list[int]:
    eos = generation_config.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]

