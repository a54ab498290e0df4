"""load_model: round trips, sharding, device/dtype choice, remote code, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_model, edit_json, write_tiny
from vdiff.models import Checkpoint, ModelLoadError, load_model, select_device, select_dtype
from vdiff.models.loader import (
    AUTO_BF16_MIN_HIDDEN,
    CPU_BF16_ENV,
    DeviceAvailability,
    auto_dtype,
    cpu_has_fast_bf16,
)
from vdiff.models.remote import RemoteCodeModel


def edit_weights(path: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None) -> None:
    state = load_file(str(path / "model.safetensors"))
    if drop:
        del state[drop]
    state.update(add or {})
    save_file(state, str(path / "model.safetensors"))


def test_round_trip_gives_the_written_tensors(tiny_model_dir: Path) -> None:
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    for dtype in (torch.bfloat16, torch.float32):
        loaded = load_model(tiny_model_dir, dtype=dtype).state_dict()
        assert set(loaded) == set(stored)
        for name, tensor in stored.items():
            assert loaded[name].dtype == dtype
            assert torch.equal(loaded[name], tensor.to(dtype)), name


def test_loaded_model_is_ready_for_inference(tiny_llada: Path) -> None:
    model = load_model(tiny_llada, dtype="float32")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)  # as transformers models have them


def test_sharded_checkpoint_loads_like_single_file(tiny_dream: Path, tmp_path: Path) -> None:
    sharded = write_tiny(tmp_path / "sharded", "dream", "--shards", "3")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert not (sharded / "model.safetensors").exists()
    ids = torch.arange(20)[None]
    single = load_model(tiny_dream, dtype="float32")(ids).logits
    torch.testing.assert_close(load_model(sharded, dtype="float32")(ids).logits, single, atol=0, rtol=0)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    sharded = write_tiny(tmp_path / "sharded", "llada", "--shards", "2")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_model(sharded)


def test_missing_tensor_is_named(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_weights(path, drop="model.transformer.blocks.1.up_proj.weight")
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.transformer\.blocks\.1\.up_proj\.weight'"):
        load_model(path)


def test_unexpected_tensor_is_named_with_its_file(tiny_dream: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_dream, tmp_path)
    edit_weights(path, add={"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        load_model(path)


def test_rotary_buffers_of_old_exports_are_ignored(tiny_dream: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_dream, tmp_path)
    edit_weights(path, add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    load_model(path)


def test_wrong_shape_names_tensor_and_config(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_json(path / "config.json", mlp_hidden_size=96)
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    message = str(error.value)
    assert "'model.transformer.blocks.0.ff_proj.weight' in model.safetensors has shape [128, 64]" in message
    assert "config.json implies [96, 64]" in message


def test_unsupported_config_value_names_the_key(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_json(path / "config.json", alibi=True)
    with pytest.raises(ModelLoadError, match=r"config\.json.*alibi=True.*not support"):
        load_model(path)


def test_inconsistent_heads_are_refused(tiny_dream: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_dream, tmp_path)
    edit_json(path / "config.json", num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="num_key_value_heads=3"):
        load_model(path)


def test_unknown_model_type_without_flag_asks_for_trust_remote_code(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_json(path / "config.json", model_type="mystery-mdm")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(path)


def test_unknown_model_type_without_code_is_unsupported(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    edit_json(path / "config.json", remove=("auto_map",), model_type="mystery-mdm")
    with pytest.raises(ModelLoadError, match=r"'mystery-mdm' is not supported \(native: Dream, llada\)"):
        load_model(path, trust_remote_code=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "config.json").unlink(), r"config\.json does not exist"),
        (lambda p: (p / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
        (lambda p: (p / "config.json").write_text("[]"), "must hold a JSON object"),
        (lambda p: (p / "config.json").write_text("{}"), "has no 'model_type'"),
        (lambda p: (p / "model.safetensors").write_bytes(b"garbage"), "not a readable safetensors file"),
        (lambda p: (p / "model.safetensors").unlink(), "has no weights"),
        (
            lambda p: (p / "generation_config.json").write_text("{"),
            r"generation_config\.json is not valid JSON",
        ),
    ],
)
def test_damaged_directories_give_clear_errors(damage, message: str, tiny_llada: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = copy_model(tiny_llada, tmp_path)
    damage(path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_bin_only_checkpoint_asks_for_conversion(tiny_llada: Path, tmp_path: Path) -> None:
    path = copy_model(tiny_llada, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="vdiff loads safetensors"):
        load_model(path)


def test_paths_that_are_not_model_directories(tiny_llada: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tiny_llada / "config.json")


def test_hub_id_offline_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="huggingface-cli download vdiff-test/no-such-model"):
        load_model("vdiff-test/no-such-model")


def test_dtype_choices(tiny_llada: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llada)
    cpu = torch.device("cpu")
    assert checkpoint.checkpoint_dtype() == torch.bfloat16
    assert select_dtype("float32", checkpoint, cpu) == torch.float32
    assert select_dtype("bf16", checkpoint, cpu) == torch.bfloat16
    assert select_dtype("half", checkpoint, cpu) == torch.float16
    assert select_dtype(torch.float16, checkpoint, cpu) == torch.float16
    assert select_dtype("auto", checkpoint, cpu) == torch.float32  # 64 wide: float32 is faster on any CPU
    assert load_model(tiny_llada, device="cpu").model.transformer["wte"].weight.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="dtype 'int8' is not supported"):
        select_dtype("int8", checkpoint, cpu)
    with pytest.raises(ModelLoadError, match="not supported"):
        select_dtype(torch.int8, checkpoint, cpu)


@pytest.mark.parametrize("native", ["1", "0"])
def test_auto_dtype_follows_the_cpu_bf16_override(
    native: str, tiny_llada: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both outcomes of auto on any machine: VDIFF_CPU_BF16 makes the loader believe the CPU has, or
    lacks, native bf16; a bf16 checkpoint at least AUTO_BF16_MIN_HIDDEN wide then loads in bf16, or
    in float32."""
    monkeypatch.setenv(CPU_BF16_ENV, native)
    cpu = torch.device("cpu")
    assert cpu_has_fast_bf16() == (native == "1")
    wide = torch.bfloat16 if native == "1" else torch.float32
    assert auto_dtype(torch.bfloat16, cpu, AUTO_BF16_MIN_HIDDEN) == wide
    assert auto_dtype(torch.bfloat16, cpu, AUTO_BF16_MIN_HIDDEN // 2) == torch.float32
    assert auto_dtype(torch.float16, cpu, AUTO_BF16_MIN_HIDDEN) == torch.float32
    copy = copy_model(tiny_llada, tmp_path)
    edit_json(copy / "config.json", d_model=AUTO_BF16_MIN_HIDDEN)  # the width auto reads
    assert select_dtype("auto", Checkpoint.open(copy), cpu) == wide


def test_a_bad_cpu_bf16_override_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "maybe")
    with pytest.raises(ModelLoadError, match="VDIFF_CPU_BF16='maybe': use 1"):
        cpu_has_fast_bf16()


def test_auto_dtype_rules() -> None:
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert auto_dtype(torch.float32, cpu) == torch.float32
    assert auto_dtype(torch.float16, cpu) == torch.float32  # fp16 on CPU is emulated
    assert auto_dtype(torch.bfloat16, mps) == torch.float16  # Metal computes in float16
    assert auto_dtype(torch.float16, mps) == torch.float16
    assert auto_dtype(torch.float32, mps) == torch.float32  # a float32 checkpoint stays float32
    cuda = torch.device("cuda")
    volta, ampere = DeviceAvailability(1), DeviceAvailability(1, cuda_bf16=True)
    assert auto_dtype(torch.bfloat16, cuda, available=ampere) == torch.bfloat16
    assert auto_dtype(torch.bfloat16, cuda, available=volta) == torch.float16  # no native bf16
    assert auto_dtype(torch.float16, cuda, available=volta) == torch.float16


def test_cpu_bf16_detection_reads_cpu_flags() -> None:
    assert cpu_has_fast_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_has_fast_bf16("flags\t\t: fpu amx_tile amx_bf16\n")
    assert cpu_has_fast_bf16("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert not cpu_has_fast_bf16("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_fast_bf16("model name\t: bf16 in a name is not a flag\n")


def test_device_choices() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="not a device name"):
        select_device("gpu please")
    with pytest.raises(ModelLoadError, match="not supported"):
        select_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            select_device("cuda")


@pytest.mark.parametrize(
    ("machine", "auto", "refused"),
    [
        (DeviceAvailability(), "cpu", {"cuda": "CUDA is not", "mps": "MPS is not"}),
        (DeviceAvailability(2, cuda_bf16=True), "cuda", {"cuda:2": "only 2 GPU", "mps": "MPS is not"}),
        (DeviceAvailability(mps=True), "mps", {"cuda:0": "CUDA is not available"}),
        (DeviceAvailability(1, mps=True), "cuda", {"cuda:1": "only 1 GPU"}),
    ],
    ids=["cpu-only", "two-gpus", "mac", "gpu-and-mps"],
)
def test_device_rules_on_any_machine(machine: DeviceAvailability, auto: str, refused: dict[str, str]) -> None:
    """The rules, given what a machine offers: auto prefers cuda, then mps; cpu is always there."""
    assert select_device("auto", machine).type == auto
    assert select_device("cpu", machine) == torch.device("cpu")
    for device, reason in refused.items():
        with pytest.raises(ModelLoadError, match=reason):
            select_device(device, machine)
    if machine.cuda_devices:
        last = machine.cuda_devices - 1
        assert select_device(f"cuda:{last}", machine).index == last


TOY_CONFIG = """
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "toy-mdm"

    def __init__(self, vocab_size=32, hidden_size=8, mask_token_id=31, **kwargs):
        self.vocab_size, self.hidden_size, self.mask_token_id = vocab_size, hidden_size, mask_token_id
        super().__init__(**kwargs)
"""

TOY_MODEL = """
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_toy import ToyConfig


class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.embed(input_ids)
        hidden = hidden + hidden.mean(dim=1, keepdim=True)  # every position sees the whole row
        return MaskedLMOutput(logits=self.head(hidden))
"""


def write_toy_remote_model(path: Path) -> None:
    path.mkdir()
    (path / "configuration_toy.py").write_text(TOY_CONFIG)
    (path / "modeling_toy.py").write_text(TOY_MODEL)
    generator = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.randn(32, 8, generator=generator),
        "head.weight": torch.randn(32, 8, generator=generator),
        "head.bias": torch.randn(32, generator=generator),
    }
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "toy-mdm",
        "architectures": ["ToyModel"],
        "auto_map": {"AutoConfig": "configuration_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel"},
        "vocab_size": 32,
        "hidden_size": 8,
        "mask_token_id": 31,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config))


def test_remote_code_runs_only_with_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "toy"
    write_toy_remote_model(path)
    with pytest.raises(ModelLoadError, match="pass --trust-remote-code"):
        load_model(path)

    model = load_model(path, trust_remote_code=True)
    assert isinstance(model, RemoteCodeModel)
    assert type(model.inner).__name__ == "ToyModel"
    assert (model.logits_shift, model.mask_token_id) == (0, 31)
    state = load_file(str(path / "model.safetensors"))
    ids = torch.tensor([[1, 2, 3, 4]])
    hidden = state["embed.weight"][ids]
    expected = (hidden + hidden.mean(dim=1, keepdim=True)) @ state["head.weight"].T + state["head.bias"]
    torch.testing.assert_close(model(ids).logits, expected)


def test_native_model_type_stays_native_with_the_flag(tiny_dream: Path) -> None:
    assert type(load_model(tiny_dream, trust_remote_code=True)).__name__ == "DreamModel"
