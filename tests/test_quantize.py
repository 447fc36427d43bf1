"""lmtool quantize: the schemes' error floors, the compressed-tensors layout checked against the
compressed-tensors package (its packer, its decompressors, its own compressor's checkpoints and
transformers' loader), round trips on tiny models of every family, verification, the command's
errors and atomicity, and every command running a quantized folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    CompressedTensorsConfig,
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    RecurrentGemmaConfig,
    RecurrentGemmaForCausalLM,
    Zamba2Config,
    Zamba2ForCausalLM,
)

import lmtool
from lmtool import kernels
from lmtool.quantize import build
from lmtool.quantize.linear import FusedQuantizedLinear
from lmtool.quantize.build import Recipe, quantize
from lmtool.quantize.schemes import pack_int32, quantize_int4_groups, quantize_int8_rows, snr_db, unpack_int32

from helpers import gemma_style_tokenizer, randomize, run_cli, save_hf, save_tokenizer, tiny_gemma_config

# compressed-tensors (the test extra) is the oracle for the layout.
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

# transformers warns that the checkpoint's own quantization_config wins over the one passed, which
# only adds dequantize=True: expected.
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
FP32_TOL = 1e-4
# Shorter than the RecurrentGemma window (8), past which lmtool follows the authors, not transformers.
IDS = torch.tensor([[2, 5, 9, 30, 7, 11, 40]])


# --- the schemes ---------------------------------------------------------------------------------


def test_snr_floors_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    int8 = quantize_int8_rows(w, torch.bfloat16)
    assert snr_db(w, int8.dequantize()) >= 40
    assert int8.codes.abs().max() <= 127 and int8.scale.shape == (512, 1)
    searched = quantize_int4_groups(w, 64, torch.bfloat16)
    plain = quantize_int4_groups(w, 64, torch.bfloat16, search=False)
    assert snr_db(w, searched.dequantize()) >= 20
    # The clipping search never does worse than min/max (it is one of its candidates).
    assert snr_db(w, searched.dequantize()) > snr_db(w, plain.dequantize())
    assert searched.codes.min() >= -8 and searched.codes.max() <= 7
    assert searched.zero_point.min() >= -8 and searched.zero_point.max() <= 7


def test_zero_rows_and_exact_zero_survive():
    w = torch.zeros(4, 64)
    w[1, 3] = 0.5
    for q in (quantize_int8_rows(w, torch.float32), quantize_int4_groups(w, 32, torch.float32)):
        back = q.dequantize()
        assert torch.isfinite(back).all() and back[0].abs().max() == 0 and back[1, 0] == 0


@pytest.mark.parametrize("bits,dim", [(4, 1), (4, 0), (8, 1)])
def test_packing_is_compressed_tensors_packing(bits, dim):
    torch.manual_seed(1)
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    codes = torch.randint(low, high, (24, 40), dtype=torch.int8)
    ours = pack_int32(codes, bits, dim=dim)
    assert torch.equal(ours, pack_to_int32(codes, bits, packed_dim=dim))
    length = codes.shape[dim]
    assert torch.equal(unpack_int32(ours, bits, length, dim=dim), codes)
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape, packed_dim=dim), codes)


@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, the tiled path
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_matmul_equals_the_dequantized_product(bits, out_features):
    from lmtool.quantize.format import QuantizedWeight, compressed_tensors
    from lmtool.quantize.linear import native_kernel, prepare, quantized_matmul

    torch.manual_seed(3)
    w = torch.randn(out_features, 128)
    q = quantize_int8_rows(w, torch.float32) if bits == 8 else quantize_int4_groups(w, 32, torch.float32)
    stored = compressed_tensors(q, tuple(w.shape))
    if bits == 8:
        weight = QuantizedWeight("w", out_features, 128, 8, stored["weight_scale"], None, codes=stored["weight"])
    else:
        weight = QuantizedWeight("w", out_features, 128, 4, q.scale, q.zero_point,
                                 nibbles=stored["weight_packed"].view(torch.uint8))
        prepare(weight, type("NoFile", (), {"release": lambda self, t: None})(), torch.float32)
        # torch's int4 layout only where lmtool's own kernel does not read the nibbles in place
        assert (weight.int4pack is not None) == (out_features % 16 == 0 and not native_kernel(weight, torch.float32))
    x = torch.randn(5, 128)
    expected = x @ q.dequantize().T
    assert (quantized_matmul(x, weight) - expected).abs().max() <= 1e-4
    assert torch.equal(weight.dequantize_rows(torch.tensor([3, 0]), torch.float32), q.dequantize()[[3, 0]])
    half = quantized_matmul(x.to(torch.bfloat16), weight).float()
    assert (half - expected).abs().max() <= 0.05 * expected.abs().max()


def test_verification_statistics_follow_their_definitions():
    from lmtool.quantize.verify import position_stats, summarize

    torch.manual_seed(0)
    ref, noise, targets = torch.randn(300, 40), torch.randn(300, 40), torch.randint(0, 40, (300,))
    quant = ref + 0.3 * noise
    stats = position_stats(ref, quant, targets)
    lp, lq = ref.double().log_softmax(-1), quant.double().log_softmax(-1)
    kld = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(stats["kld"], kld)
    report = summarize(stats, max_kld=1.0, min_top1=0.0)
    assert report["kld"]["mean"] == pytest.approx(kld.mean().item(), abs=1e-6)
    assert report["kld"]["max"] == pytest.approx(kld.max().item(), abs=1e-6)
    same = (ref.argmax(-1) == quant.argmax(-1)).double().mean().item()
    assert report["same_top1_pct"] == pytest.approx(100 * same, abs=1e-3)
    rows = torch.arange(300)
    nll_ref, nll_q = -lp[rows, targets], -lq[rows, targets]
    assert report["ppl"]["ratio"] == pytest.approx(torch.exp((nll_q - nll_ref).mean()).item(), rel=1e-5)
    dp = lq[rows, targets].exp() - lp[rows, targets].exp()
    assert report["delta_p_pct"]["rms"] == pytest.approx(100 * dp.square().mean().sqrt().item(), abs=1e-4)
    assert report["passed"] and not summarize(stats, max_kld=kld.mean().item() / 2, min_top1=0.0)["passed"]
    same_model = summarize(position_stats(ref, ref, targets), max_kld=0.0, min_top1=100.0)
    assert same_model["kld"]["max"] == 0 and same_model["ppl"]["ratio"] == 1.0 and same_model["passed"]


# --- tiny models of every family -----------------------------------------------------------------


def _gemma():
    return GemmaForCausalLM(tiny_gemma_config(hidden_size=64, intermediate_size=128, head_dim=16))


def _bloom():
    return BloomForCausalLM(BloomConfig(vocab_size=120, hidden_size=64, n_layer=2, n_head=4, pad_token_id=0,
                                        bos_token_id=2, eos_token_id=1))


def _recurrent_gemma():
    return RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, lru_width=64, attention_window_size=8, conv1d_width=4, pad_token_id=0,
        eos_token_id=1, bos_token_id=2))


def _zamba2():
    layers = ["mamba", "hybrid", "mamba", "hybrid"]
    model = Zamba2ForCausalLM(Zamba2Config(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8, chunk_size=4,
        adapter_rank=8, layers_block_type=layers, num_hidden_layers=len(layers), num_mem_blocks=2,
        use_shared_attention_adapter=True, pad_token_id=0, bos_token_id=2, eos_token_id=1))
    return model


FAMILIES = {"gemma": _gemma, "bloom": _bloom, "recurrent_gemma": _recurrent_gemma, "zamba2": _zamba2}


def _randomized(model):
    """Random weights with Mamba2's decays and time steps in their working ranges (any family)."""
    from test_zamba2 import randomized

    return randomized(model, std=0.1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_source(request, tmp_path_factory):
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp(request.param)
    save_hf(_randomized(FAMILIES[request.param]()), folder, gemma_style_tokenizer())
    return request.param, folder


def ct_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as the compressed-tensors package decompresses it, using the
    config group (scheme and format) config.json assigns to the module."""
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    weights = {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for group in quant["config_groups"].values():
            scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]),
                                        format=group["format"])
            compressor = BaseCompressor.get_value_from_registry(group["format"])
            for module in group["targets"]:
                state = {k[len(module) + 1:]: f.get_tensor(k) for k in keys if k.rsplit(".", 1)[0] == module}
                weights[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"].float()
    return weights


@pytest.mark.parametrize("scheme", ["int8", "int4-m"])
def test_round_trip_every_family_equals_compressed_tensors_decompression(family_source, scheme, tmp_path):
    family, src = family_source
    out = tmp_path / "q"
    summary = quantize(str(src), out, Recipe(scheme, group_size=32), verify=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    # Kept in float: norms, biases, 1-D tensors, convolutions, RG-LRU gates, Mamba2 A_log/D/dt_bias, adapters.
    for key, dtype in stored.items():
        if any(part in key for part in ("norm", "bias", "conv", "A_log", ".D", "gate_weight", "adapter")):
            assert dtype in ("F32", "F16", "BF16"), key
    bits = {t["bits"] for t in summary["tensors"].values()}
    assert bits == ({8} if scheme == "int8" else {4, 8})
    assert all(t["snr_db"] > (35 if t["bits"] == 8 else 15) for t in summary["tensors"].values())
    # The oracle: transformers' float model with compressed-tensors' decompression of our tensors.
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    missing, unexpected = reference.load_state_dict(ct_dequantized(out), strict=False)
    assert not unexpected
    ours = lmtool.load(out, dtype="float32")
    plain = lmtool.load(out, dtype="float32", frozen=False)
    with torch.no_grad():
        expected = reference(IDS).logits
        assert (ours.model(IDS) - expected).abs().max() <= FP32_TOL
        assert (plain.model(IDS) - expected).abs().max() <= FP32_TOL
    # The quantized modules hold no float copy of their weights: their state_dict entries are the
    # stored codes and scales (a tied head adds nothing), and the float parameters left are few.
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, tensor in ours.model.state_dict().items():
            if not tensor.is_floating_point():
                assert name in f.keys(), name
                assert torch.equal(tensor, f.get_tensor(name)), name
    assert sum(p.numel() for p in ours.model.parameters()) < sum(p.numel() for p in reference.parameters()) / 2


def test_int4_layers_read_alike_run_as_one_and_give_what_the_separate_ones_give(family_source, tmp_path):
    # Where lmtool's kernel interleaves int4 rows (x86, bfloat16 activations), an owner's `fusion`
    # group (q/k/v, gate/up, RecurrentGemma's y/x with their biases) loads as one layer over a
    # joined copy. It must give what the separate layers give (frozen=False keeps them apart): the
    # same bits at every decode step, the prefill within a bfloat16 rounding, the same greedy tokens,
    # and a state_dict that is theirs.
    family, src = family_source
    out = tmp_path / "q"
    quantize(str(src), out, Recipe("int4", group_size=32), verify=False)
    joined = lmtool.load(out, dtype="bfloat16").model
    separate = lmtool.load(out, dtype="bfloat16", frozen=False).model
    fused = [m for m in joined.modules() if isinstance(m, FusedQuantizedLinear)]
    assert not any(isinstance(m, FusedQuantizedLinear) for m in separate.modules())
    if kernels.available() and kernels.library().lm_int4_row_block(1, 32) > 1 and family in ("gemma", "recurrent_gemma"):
        assert fused and all(len(m.parts) > 1 for m in fused)
    ours, theirs = joined.state_dict(), separate.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.inference_mode():
        caches = [joined.make_cache(1, 32), separate.make_cache(1, 32)]
        a, b = (model(IDS[:, :5], cache=cache) for model, cache in zip((joined, separate), caches))
        assert (a.float() - b.float()).abs().max() <= 2**-7 * b.float().abs().max()
        tokens = [a[:, -1:].argmax(-1), b[:, -1:].argmax(-1)]
        for _ in range(6):
            a, b = (model(token, cache=cache) for model, token, cache in zip((joined, separate), tokens, caches))
            assert torch.equal(a, b)
            tokens = [a[:, -1:].argmax(-1), b[:, -1:].argmax(-1)]


def test_untied_head_is_quantized_on_its_own(tmp_path):
    torch.manual_seed(8)
    model = GemmaForCausalLM(tiny_gemma_config(hidden_size=64, intermediate_size=128, head_dim=16,
                                               tie_word_embeddings=False))
    src = save_hf(_randomized(model), tmp_path / "src", gemma_style_tokenizer())
    summary = quantize(str(src), tmp_path / "q", Recipe("int4", group_size=32), verify=False)
    assert summary["tensors"]["lm_head"]["bits"] == 8 and summary["tensors"]["model.embed_tokens"]["bits"] == 8
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    reference.load_state_dict(ct_dequantized(tmp_path / "q"), strict=False)
    ours = lmtool.load(tmp_path / "q", dtype="float32")
    with torch.no_grad():
        assert (ours.model(IDS) - reference(IDS).logits).abs().max() <= FP32_TOL
    assert any(name.startswith("lm_head.") for name in ours.model.state_dict())


def test_transformers_loads_lmtool_int8_and_int4_and_agrees(tmp_path):
    torch.manual_seed(6)
    src = save_hf(_randomized(_gemma()), tmp_path / "src", gemma_style_tokenizer())
    # transformers 5.23 dequantizes every module with one config group's scheme, so the int4 file
    # it loads has a float head (a single int4 group).
    for scheme, head in (("int8", "int8"), ("int4", "bf16")):
        out = tmp_path / scheme
        quantize(str(src), out, Recipe(scheme, group_size=32, head=head), verify=False)
        theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
        with torch.no_grad():
            diff = (lmtool.load(out).model(IDS) - theirs(IDS).logits).abs().max()
        assert diff <= FP32_TOL, (scheme, diff)


def _ct_checkpoint(folder: Path, bits: int, strategy: str, symmetric: bool, group_size: int | None) -> GemmaForCausalLM:
    """A checkpoint quantized and saved by compressed-tensors itself (as llm-compressor does)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(2)
    model = _randomized(_gemma())
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data.float()
            grouped = w.reshape(w.shape[0], -1, group_size or w.shape[1])
            scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    save_tokenizer(folder, gemma_style_tokenizer())
    return model


@pytest.mark.parametrize("bits,strategy,symmetric,group", [(8, "channel", True, None), (4, "group", False, 32)])
def test_compressed_tensors_own_checkpoints_load(tmp_path, capsys, bits, strategy, symmetric, group):
    _ct_checkpoint(tmp_path, bits, strategy, symmetric, group)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = lmtool.load(tmp_path, dtype="float32")
    with torch.no_grad():
        assert (ours.model(IDS) - theirs(IDS).logits).abs().max() <= FP32_TOL
    code, out, err = run_cli(capsys, "generate", str(tmp_path), "Simple is", "-n", "4", "--temperature", "0")
    assert code == 0, err


# --- the command ---------------------------------------------------------------------------------

DEMO = str(Path(lmtool.__file__).parent / "demo" / "zen-gemma")


def test_cli_quantizes_verifies_and_every_command_runs_the_result(tmp_path, capsys):
    out = tmp_path / "zen-int8"
    code, stdout, stderr = run_cli(capsys, "quantize", DEMO, str(out), "--scheme", "int8", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    report = summary["verification"]
    assert report["passed"] and report["kld"]["mean"] < 0.01 and report["same_top1_pct"] > 95
    assert set(report["kld"]) >= {"mean", "median", "p99", "max"}
    assert {"ratio", "ratio_err"} <= set(report["ppl"]) and {"mean", "rms"} <= set(report["delta_p_pct"])
    stored = json.loads((out / "config.json").read_text())
    assert stored["quantization_config"]["quant_method"] == "compressed-tensors"
    assert stored["lmtool_quantization"]["verification"] == report
    assert stored["lmtool_quantization"]["source_checksum"].startswith("sha256:")
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    code, text, _ = run_cli(capsys, "generate", str(out), "Beautiful is", "--temperature", "0", "-n", "8")
    assert code == 0 and text.strip()
    code, text, _ = run_cli(capsys, "inspect", str(out), "--json")
    assert code == 0
    shown = json.loads(text)["quantization"]
    assert shown["scheme"] == "int8" and 8 <= shown["bits_per_weight"] < 9
    assert shown["groups"]["int8 per row"]["tensors"] == summary["quantized_tensors"]
    code, text, _ = run_cli(capsys, "inspect", DEMO, "--json")
    assert shown["parameters"] == json.loads(text)["parameters"]


def test_quality_gate_failure_exits_6_and_keeps_out(tmp_path, capsys):
    out = tmp_path / "zen-int4"
    code, _, stderr = run_cli(capsys, "quantize", DEMO, str(out), "--scheme", "int4", "--min-top1", "100.1")
    assert code == 6
    assert (out / "config.json").is_file() and "quality gates" in stderr


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int3"], "unknown scheme 'int3'"),
    (["--scheme", "int4", "--group-size", "48"], "group size 48 not supported"),
    (["--scheme", "int4", "--eval-text", "/nonexistent/text.txt"], "/nonexistent/text.txt: no such file"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    code, _, stderr = run_cli(capsys, "quantize", DEMO, str(tmp_path / "out"), *args)
    assert code != 0 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_already_quantized_and_undivisible_sources_are_refused(tmp_path, capsys):
    quantized = tmp_path / "q"
    assert run_cli(capsys, "quantize", DEMO, str(quantized), "--scheme", "int8", "--no-verify")[0] == 0
    code, _, stderr = run_cli(capsys, "quantize", str(quantized), str(tmp_path / "qq"), "--scheme", "int8")
    assert code == 1 and "already quantized (compressed-tensors)" in stderr and str(quantized) in stderr
    odd = save_hf(randomize(GemmaForCausalLM(tiny_gemma_config(intermediate_size=48))), tmp_path / "odd")
    capsys.readouterr()  # transformers' own progress while saving
    code, _, stderr = run_cli(capsys, "quantize", str(odd), str(tmp_path / "o4"), "--scheme", "int4",
                              "--group-size", "32", "--no-verify")
    assert code == 1 and "group size 32 does not divide the 48 columns of 'model.layers.0.mlp.down_proj.weight'" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o4").exists()


def test_interrupted_quantize_leaves_nothing(tmp_path, monkeypatch):
    original = build.quantize_tensor
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(build, "quantize_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(DEMO, tmp_path / "out", Recipe("int4", group_size=32), verify=False)
    assert list(tmp_path.iterdir()) == []


def test_keep_and_bf16_head(tmp_path):
    summary = quantize(DEMO, tmp_path / "k", Recipe("int8", keep=r"mlp\.", head="bf16"), verify=False)
    names = set(summary["tensors"])
    assert names and not any("mlp." in n or "embed" in n for n in names)


def test_task_heads_run_quantized(tmp_path, capsys):
    torch.manual_seed(4)
    config = tiny_gemma_config(hidden_size=64, intermediate_size=128, head_dim=16, id2label={0: "neg", 1: "pos"})
    src = save_hf(randomize(GemmaForSequenceClassification(config)), tmp_path / "cls", gemma_style_tokenizer())
    quantize(str(src), tmp_path / "cls-q", Recipe("int4", group_size=32), verify=False)
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "cls-q"), "--text", "Simple is better", "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["label"] in ("neg", "pos")
