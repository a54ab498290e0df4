"""bitsandbytes quantization on the CPU (bitsandbytes 0.50's CPU backend): the transform applied at
load, checkpoints quantized as transformers writes them, and every refusal.

Tolerances are relative Frobenius errors of the logits against the same model unquantized, in the
same dtype: measured on the tiny checkpoints and the demo model at 0.015-0.027 (8-bit),
0.12-0.14 (NF4) and 0.17-0.19 (FP4), so the bounds below leave room for another CPU's rounding
and still fail a quantizer that is off by a format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from apd_oracle import apd_reference
from fast_dllm_oracles import fast_dllm_cached_reference
from safetensors import safe_open
from torch import nn

from conftest import copy_model, edit_json, write_tiny
from oracles import llada_reference
from reference_code import REFERENCE, with_reference_code
from vdiff import LLM, EngineConfig, SamplingParams
from vdiff.models import ModelLoadError, load_model
from vdiff.models.layers import RMSNorm
from vdiff.models.quantization import (
    Quantization,
    QuantizationFlags,
    checkpoint_quantization,
    linear_weight_bytes,
    plan_quantization,
)
from vdiff.training.demo_task import accuracy_by_family, held_out_set

FLAGS = {
    "8bit": QuantizationFlags("bitsandbytes-8bit"),
    "nf4": QuantizationFlags("bitsandbytes"),  # vLLM's meaning: 4-bit NF4
    "fp4": QuantizationFlags("bitsandbytes-4bit", "fp4"),
}
PROMPT = [17, 42, 99, 7, 256, 31, 5]
MAX_RELATIVE_ERROR = {"8bit": 0.04, "nf4": 0.17, "fp4": 0.23}
LAYER_CLASS = {"8bit": "Linear8bitLt", "nf4": "Linear4bit", "fp4": "Linear4bit"}


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float() - reference.float()).norm() / reference.float().norm())


def canvas(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 380, (2, 48), generator=torch.Generator().manual_seed(seed))


def blocks(model: nn.Module) -> nn.Module:
    inner = model.model
    return inner.transformer["blocks"] if hasattr(inner, "transformer") else inner.layers


def head(model: nn.Module) -> nn.Module:
    inner = model.model
    return inner.transformer["ff_out"] if hasattr(inner, "transformer") else model.lm_head


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(FLAGS))
def test_quantized_forward_stays_close(tiny_model_dir: Path, method: str, dtype: str) -> None:
    """The blocks' linear layers become bitsandbytes layers; embeddings, norms and the head do not;
    the logits move by the format's error and no more."""
    plain = load_model(tiny_model_dir, dtype=dtype, device="cpu")
    model = load_model(tiny_model_dir, dtype=dtype, device="cpu", quantization=FLAGS[method])
    linears = [m for m in blocks(model).modules() if isinstance(m, nn.Linear)]
    linear_classes = {type(m).__name__ for m in linears}
    assert linear_classes == {LAYER_CLASS[method]}
    assert type(head(model)) is nn.Linear and torch.equal(head(model).weight, head(plain).weight)
    leaves = [m for m in model.modules() if not (list(m.children()) or isinstance(m, nn.Linear))]
    assert all(type(m) in (nn.Embedding, RMSNorm) for m in leaves)
    with torch.inference_mode():
        error = relative_error(model(canvas()).logits, plain(canvas()).logits)
    assert 1e-4 < error < MAX_RELATIVE_ERROR[method], error


def test_nf4_is_closer_than_fp4(tiny_llada: Path) -> None:
    """NF4's levels are normal quantiles, which is why vLLM picks it for normal weights."""
    plain = load_model(tiny_llada, dtype="float32", device="cpu")
    with torch.inference_mode():
        reference = plain(canvas()).logits
        errors = {}
        for method in ("nf4", "fp4"):
            model = load_model(tiny_llada, dtype="float32", quantization=FLAGS[method])
            errors[method] = relative_error(model(canvas()).logits, reference)
    assert errors["nf4"] < errors["fp4"], errors


@pytest.mark.parametrize(("method", "most"), [("8bit", 0.55), ("nf4", 0.30)])
def test_quantized_blocks_take_less_memory(tiny_llada: Path, method: str, most: float) -> None:
    """The blocks' weight bytes against bf16, the statistics (scales, absmax, code) included."""
    plain = load_model(tiny_llada, dtype="bfloat16", device="cpu")
    model = load_model(tiny_llada, dtype="bfloat16", device="cpu", quantization=FLAGS[method])
    assert linear_weight_bytes(blocks(model)) <= most * linear_weight_bytes(blocks(plain))


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_checkpoint_round_trip(tmp_path: Path, arch: str, bits: str) -> None:
    """make_tiny_model.py --quantize writes what loads back, without --quantization, into the
    same layers quantizing the plain checkpoint at load gives: equal logits, bit for bit."""
    plain = write_tiny(tmp_path / "plain", arch)
    stored = write_tiny(tmp_path / "quantized", arch, "--quantize", bits, "--double-quant")
    config = json.loads((stored / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config[f"load_in_{bits}"] is True
    plan = Quantization(bits=int(bits[0]), double_quant=True)
    with torch.inference_mode():
        at_load = load_model(plain, dtype="bfloat16", device="cpu", quantization=plan)
        expected = at_load(canvas()).logits
        loaded = load_model(stored, dtype="bfloat16", device="cpu")
        assert torch.equal(loaded(canvas()).logits, expected)
        # vLLM's name for any bitsandbytes checkpoint is accepted, and changes nothing
        named = load_model(stored, dtype="bfloat16", device="cpu", quantization=FLAGS["nf4"])
        assert torch.equal(named(canvas()).logits, expected)


def test_quantized_checkpoint_refuses_another_method(tmp_path: Path) -> None:
    stored = write_tiny(tmp_path / "q", "llada", "--quantize", "4bit")
    with pytest.raises(ModelLoadError, match="already quantized .*4-bit NF4.*bitsandbytes-8bit"):
        load_model(stored, device="cpu", quantization=FLAGS["8bit"])
    with pytest.raises(ModelLoadError, match="--bnb-4bit-quant-type fp4"):
        load_model(stored, device="cpu", quantization=FLAGS["fp4"])


def test_damaged_quantized_checkpoints_are_refused_before_reading(tmp_path: Path) -> None:
    """config.json and the tensors must describe the same quantization, as for plain shapes."""
    stored = write_tiny(tmp_path / "q", "llada", "--quantize", "4bit")
    fp4 = copy_model(stored, tmp_path / "fp4")
    config = json.loads((fp4 / "config.json").read_text())
    as_fp4 = {**config["quantization_config"], "bnb_4bit_quant_type": "fp4"}
    edit_json(fp4 / "config.json", quantization_config=as_fp4)
    with pytest.raises(ModelLoadError, match=r"missing tensor .*quant_state\.bitsandbytes__fp4"):
        load_model(fp4, device="cpu")
    eight = copy_model(stored, tmp_path / "eight")
    as_8bit = {**config["quantization_config"], "load_in_4bit": False, "load_in_8bit": True}
    edit_json(eight / "config.json", quantization_config=as_8bit)
    with pytest.raises(ModelLoadError, match=r"missing tensor '.*q_proj\.SCB' \(shape \[64\]\)"):
        load_model(eight, device="cpu")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "exactly one"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "int4"),
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, "quant_storage"),
        ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "training layout"),
    ],
)
def test_unsupported_quantization_configs_are_named(config: dict[str, Any], message: str) -> None:
    raw = {"quant_method": "bitsandbytes", **config}
    with pytest.raises(ModelLoadError, match=message):
        checkpoint_quantization({"quantization_config": raw}, "m/config.json")


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_checkpoint_equals_transformers_save_pretrained(tmp_path: Path, bits: str) -> None:
    """The key set, dtypes, shapes and bytes bitsandbytes writes through transformers: Dream's
    checkpoint names are Qwen2's, so transformers quantizes the same plain weights as Qwen2 and
    saves them, and make_tiny_model.py --quantize must write the identical files."""
    from transformers import BitsAndBytesConfig, Qwen2ForCausalLM

    plain = write_tiny(tmp_path / "plain", "dream")
    as_qwen2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    edit_json(plain / "config.json", remove=("auto_map",), **as_qwen2)
    # diffusion sampling fields, which transformers refuses to save
    (plain / "generation_config.json").unlink()
    four = bits == "4bit"
    settings = BitsAndBytesConfig(load_in_8bit=True)  # LLM.int8 has no other setting
    if four:
        settings = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    theirs = Qwen2ForCausalLM.from_pretrained(
        plain,
        dtype=torch.bfloat16,
        quantization_config=settings,
    )
    theirs.save_pretrained(tmp_path / "hf")
    double = ["--double-quant"] if four else []
    ours = write_tiny(tmp_path / "ours", "dream", "--quantize", bits, *double)
    assert_same_checkpoint(tmp_path / "hf", ours)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
@pytest.mark.reference
@pytest.mark.skipif(not REFERENCE, reason="set VDIFF_REFERENCE_CODE to the official code")
def test_llada_checkpoint_equals_official_code_quantized(tmp_path: Path, bits: str) -> None:
    """LLaDA's own modeling code (trust_remote_code) quantized and saved by transformers: the
    same files as make_tiny_model.py --quantize (transformers keeps the head, ff_out)."""
    from transformers import AutoModel, BitsAndBytesConfig

    plain = write_tiny(tmp_path / "plain", "llada")
    plain = with_reference_code(plain, "llada", tmp_path, name="official")
    (plain / "generation_config.json").unlink()
    four = bits == "4bit"
    settings = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_type="nf4",
    )
    official = AutoModel.from_pretrained(
        str(plain), trust_remote_code=True, dtype=torch.bfloat16,
        quantization_config=settings if four else BitsAndBytesConfig(load_in_8bit=True),
    )  # fmt: skip
    official.save_pretrained(tmp_path / "hf")
    ours = write_tiny(tmp_path / "ours", "llada", "--quantize", bits)
    assert_same_checkpoint(tmp_path / "hf", ours)


def assert_same_checkpoint(theirs_dir: Path, ours_dir: Path) -> None:
    theirs, mine = tensors(theirs_dir), tensors(ours_dir)
    assert sorted(theirs) == sorted(mine)
    for name, tensor in theirs.items():
        assert (tensor.dtype, tensor.shape) == (mine[name].dtype, mine[name].shape), name
        assert torch.equal(tensor, mine[name]), name
    written = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    assert written == json.loads((theirs_dir / "config.json").read_text())["quantization_config"]


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("awq",), "--quantization 'awq'"),
        (("bitsandbytes-8bit", "fp4"), "--bnb-4bit-quant-type"),
        (("bitsandbytes-8bit", None, "float16"), "--bnb-4bit-compute-dtype apply to 4-bit"),
        (("bitsandbytes", "int4"), "--bnb-4bit-quant-type 'int4'"),
        (("bitsandbytes", None, "float64"), "--bnb-4bit-compute-dtype 'float64'"),
        ((None, "fp4"), "need --quantization"),
    ],
)
def test_bad_flags_name_the_flag(args: tuple[str | None, ...], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        QuantizationFlags.parse(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=flag):
        EngineConfig("m", quantization=args[0], bnb_4bit_quant_type=(args + (None,))[1],
                     bnb_4bit_compute_dtype=(args + (None, "auto"))[2] or "auto")  # fmt: skip


def test_batch_invariant_mode_refuses_quantization(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_invariant cannot be combined with bitsandbytes"):
        EngineConfig("m", quantization="bitsandbytes", batch_invariant=True)
    stored = write_tiny(tmp_path / "q", "llada", "--quantize", "8bit")
    with pytest.raises(ValueError, match="batch_invariant cannot be combined with bitsandbytes"):
        LLM(stored, device="cpu", batch_invariant=True)


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_devices_bitsandbytes_does_not_run_on_are_refused(device: str) -> None:
    """Decided before any layer is built: the plan names the device."""
    with pytest.raises(ModelLoadError, match=f"does not run on {device}"):
        plan_quantization(FLAGS["nf4"], None, torch.device(device), "m/config.json")


def test_missing_bitsandbytes_says_how_to_install(tiny_llada: Path) -> None:
    """Run where bitsandbytes cannot be imported (a meta-path finder hides it, as an environment
    without the package has none): the error names the package and the extra to install."""
    script = f"""
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ModuleNotFoundError("No module named bitsandbytes", name=name)
sys.meta_path.insert(0, Hide())
from vdiff.models import ModelLoadError, load_model
from vdiff.models.quantization import QuantizationFlags
try:
    load_model({str(tiny_llada)!r}, device="cpu", quantization=QuantizationFlags("bitsandbytes"))
except ModelLoadError as error:
    print(error)
"""
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "needs the bitsandbytes package" in result.stdout, result
    assert "vdiff[quant]" in result.stdout


def test_accuracy_floor_on_the_demo_sample() -> None:
    """The trained demo model keeps its answers quantized: 3 held-out problems per family, with
    Fast-dLLM's threshold rule (fast on the CPU); bf16, 8-bit and NF4 answer 17-18 of 18 here."""
    problems = held_out_set(3)
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    params = SamplingParams(threshold=0.9)
    for flags, floor in (("bitsandbytes-8bit", 0.8), ("bitsandbytes", 0.75)):
        llm = LLM(dtype="bfloat16", device="cpu", quantization=flags, max_num_seqs=len(problems))
        replies = [output.text for output in llm.chat(conversations, params)]
        accuracy = accuracy_by_family(problems, replies)
        assert accuracy["mean"] >= floor, (flags, accuracy)


@pytest.fixture(scope="module", params=["8bit", "nf4"])
def quantized_llm(
    request: pytest.FixtureRequest,
    tiny_llada: Path,
    tiny_llada_verifier: Path,
) -> LLM:
    method = FLAGS[request.param].method
    verifier = str(tiny_llada_verifier)
    return LLM(tiny_llada, verifier=verifier, dtype="float32", quantization=method, max_num_seqs=4)


def test_the_schedule_drives_quantized_layers_as_the_published_loop(quantized_llm: LLM) -> None:
    """The engine's forwards (head on a few rows, gathered canvases) over bitsandbytes layers
    equal LLaDA's published generate() run on the same quantized model, token for token."""
    mask = quantized_llm.tokenizer.special.mask
    model = quantized_llm.model
    shape = {"steps": 16, "block_length": 8}
    expected = llada_reference(model, PROMPT, mask_id=mask, gen_length=32, **shape)
    params = SamplingParams(max_tokens=32, full_canvas=True, temperature=0.0, **shape)
    assert quantized_llm.generate([PROMPT], params)[0].token_ids == expected


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_windows_over_quantized_layers_match_fast_dllm(
    quantized_llm: LLM,
    cache: str,
) -> None:
    """Cached windows feed the quantized layers a few positions at a time (3D inputs of other
    shapes); Fast-dLLM's loop on the same quantized model gives the same tokens and forwards."""
    mask = quantized_llm.tokenizer.special.mask
    shape = {"gen_length": 32, "block_length": 8, "steps": 16}
    model = quantized_llm.model
    expected, nfe = fast_dllm_cached_reference(model, PROMPT, mask_id=mask, cache=cache, **shape)
    params = SamplingParams(
        max_tokens=32,
        steps=16,
        block_length=8,
        full_canvas=True,
        confidence_dtype="float64",
        cache=cache,
        temperature=0.0,
    )
    out = quantized_llm.generate([PROMPT], params)[0]
    assert (out.token_ids, out.nfe) == (expected, nfe)


def test_apd_over_quantized_layers_matches_the_published_loop(quantized_llm: LLM) -> None:
    verifier = quantized_llm.engine.verifier
    assert verifier is not None
    mask = quantized_llm.tokenizer.special.mask
    apd = {"mixture_weight": 0.7, "kv_window": 4, "stop_ids": set(), "mask_id": mask}
    models = (quantized_llm.model, verifier.model)
    expected, rounds = apd_reference(*models, PROMPT, gen_length=24, **apd)
    params = SamplingParams(
        algorithm="apd",
        max_tokens=24,
        full_canvas=True,
        apd_mixture_weight=0.7,
        apd_kv_window=4,
        temperature=0.0,
    )
    out = quantized_llm.generate([PROMPT], params)[0]
    assert (out.token_ids, out.nfe) == (expected, rounds)


def test_skip_modules_follow_transformers_rule(tmp_path: Path) -> None:
    """llm_int8_skip_modules names a module or one it lies inside, as transformers reads it."""
    plan = Quantization(bits=8, skip_modules=("lm_head", "model.layers.0"))
    assert plan.keeps("lm_head") and plan.keeps("model.layers.0.mlp.down_proj")
    assert not plan.keeps("model.layers.10.mlp.down_proj")
    assert not plan.keeps("model.layers.1.lm_head_x")
    plain = write_tiny(tmp_path / "plain", "dream")
    model = load_model(plain, device="cpu", quantization=plan)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.0.mlp.down_proj"] == "Linear"
    assert kinds["model.layers.1.mlp.down_proj"] == "Linear8bitLt"
