"""`load_model`: a Hugging Face model directory -> a ready, eval-mode model on its device.

Known `model_type`s get vdiff's native implementation (registry.py), built on the meta device
and filled tensor by tensor from safetensors after every name and shape has been checked
against the config. Unknown ones run the checkpoint's own code only with trust_remote_code.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vdiff.models.checkpoint import CONFIG_FILE, Checkpoint, ModelLoadError
from vdiff.models.configs import ConfigError
from vdiff.models.layers import attention_backend
from vdiff.models.quantization import (
    Quantization,
    QuantizationFlags,
    load_quantized_layers,
    plan_for_checkpoint,
    quantize_linear_layers,
    quantized_module_names,
    quantized_weight_keys,
)
from vdiff.models.registry import Architecture, native_architecture, supported_model_types

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
log = logging.getLogger(__name__)
_MAX_LISTED = 8  # problems listed in one error message before "... and N more"
# The narrowest model that auto runs in bf16 on a CPU with native bf16: below it float32 was
# faster at one request (2-layer LLaDA, perf/results/dtype_cpu.md: 128 wide, bf16 took 1.08x
# float32's time at 1 request, 0.76x at 16; from 256 on 0.38-0.91x at both).
AUTO_BF16_MIN_HIDDEN = 256

# Overrides what the CPU's flags say about bf16: "1" treats it as native, "0" as emulated. Tests
# run the `auto` rules both ways on any machine; a user can pin auto's choice across a fleet.
CPU_BF16_ENV = "VDIFF_CPU_BF16"


def load_model(
    path: str | os.PathLike[str] | Checkpoint,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    quantization: QuantizationFlags | Quantization | None = None,
) -> nn.Module:
    """Load a diffusion LM; the result follows `vdiff.models.base.DiffusionLM`.

    A checkpoint quantized with bitsandbytes loads as such; `quantization` quantizes a plain one
    (its linear layers, not the embeddings, norms or LM head) as it loads."""
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    target = select_device(device)
    torch_dtype = select_dtype(dtype, checkpoint, target)
    plan = plan_for_checkpoint(checkpoint, quantization, target)
    architecture = native_architecture(checkpoint.model_type)
    if architecture is None:
        if plan is not None:
            native = ", ".join(supported_model_types())
            where = checkpoint.path / CONFIG_FILE
            raise ModelLoadError(f"{where}: quantization needs a native architecture ({native})")
        return _load_remote(checkpoint, target, torch_dtype, trust_remote_code)
    model = _build_on_meta(architecture, checkpoint)
    quantized = quantized_module_names(model, plan, architecture.head_modules) if plan else []
    stored = plan if plan and plan.prequantized else None
    _check_names_and_shapes(model, checkpoint, architecture, stored, quantized)
    if plan is None:
        _fill_weights(model, checkpoint, target, torch_dtype)
    elif plan.prequantized:
        _fill_prequantized(model, checkpoint, plan, quantized, target, torch_dtype)
    else:  # the full-width weights stay on the CPU; each layer is quantized as it moves
        _fill_weights(model, checkpoint, torch.device("cpu"), torch_dtype)
        quantize_linear_layers(model, plan, quantized, target)
        model.to(target)
    log.info(
        "%s: %s on %s in %s, %s attention%s", checkpoint.path.name, checkpoint.model_type, target,
        str(torch_dtype).removeprefix("torch."), attention_backend(target, torch_dtype),
        f", {plan.describe()} ({len(quantized)} layers)" if plan else "",
    )  # fmt: skip
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class DeviceAvailability:
    """What this machine offers; the device and dtype rules take it, so they can be tested as any
    machine (a GPU box, a Mac) anywhere."""

    cuda_devices: int = 0
    cuda_bf16: bool = False  # the GPUs compute in bfloat16 natively (Ampere and later)
    mps: bool = False

    @classmethod
    def here(cls) -> DeviceAvailability:
        cuda = torch.cuda.is_available()
        return cls(
            cuda_devices=torch.cuda.device_count() if cuda else 0,
            cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
            mps=torch.backends.mps.is_available(),
        )


def select_device(requested: str | torch.device = "auto", available: DeviceAvailability | None = None) -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device must be usable here."""
    available = available or DeviceAvailability.here()
    if str(requested) == "auto":
        if available.cuda_devices:
            return torch.device("cuda")
        return torch.device("mps") if available.mps else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ModelLoadError(
            f"device {requested!r} is not a device name (use auto, cuda, cuda:N, mps or cpu)"
        ) from None
    if device.type == "cuda" and not available.cuda_devices:
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available to this torch build")
    count = available.cuda_devices
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ModelLoadError(f"device {requested!r} requested but only {count} GPU(s) are visible")
    if device.type == "mps" and not available.mps:
        raise ModelLoadError(f"device {requested!r} requested but MPS is not available on this machine")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ModelLoadError(f"device {requested!r} is not supported (use auto, cuda, cuda:N, mps or cpu)")
    return device


def select_dtype(requested: str | torch.dtype, checkpoint: Checkpoint, device: torch.device) -> torch.dtype:
    """An explicit dtype wins; "auto" takes the checkpoint's, unless the device cannot run it fast."""
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise ModelLoadError(f"dtype {requested} is not supported (use float32, bfloat16 or float16)")
        return requested
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelLoadError(f"dtype {requested!r} is not supported (use auto, float32, bfloat16 or float16)")
        return DTYPES[requested]
    width = checkpoint.config.get("d_model") or checkpoint.config.get("hidden_size")
    return auto_dtype(checkpoint.checkpoint_dtype() or torch.float32, device, width)


def auto_dtype(
    stored: torch.dtype,
    device: torch.device,
    hidden_size: int | None = None,
    available: DeviceAvailability | None = None,
) -> torch.dtype:
    """The dtype "auto" runs a checkpoint stored in `stored` in on `device`."""
    if stored not in (torch.bfloat16, torch.float16):
        return torch.float32
    if device.type == "mps":  # float16: every macOS with MPS runs it (bfloat16 needs macOS 14)
        return torch.float16
    if device.type == "cpu":
        # Half precision on a CPU without bf16 instructions is emulated and several times slower;
        # with them, narrow models still run faster in float32 (perf/results/dtype_cpu.md).
        wide = hidden_size is None or hidden_size >= AUTO_BF16_MIN_HIDDEN
        return torch.bfloat16 if stored == torch.bfloat16 and wide and cpu_has_fast_bf16() else torch.float32
    if device.type == "cuda" and stored == torch.bfloat16:
        native = (available or DeviceAvailability.here()).cuda_bf16
        return torch.bfloat16 if native else torch.float16
    return stored


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has native bf16 arithmetic (x86 AVX512-BF16/AMX-BF16, Arm BF16), or
    when VDIFF_CPU_BF16 says so; `cpuinfo` (the text of /proc/cpuinfo) bypasses both."""
    if cpuinfo is not None:
        return _flags_have_bf16(cpuinfo)
    override = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if override in ("1", "true", "yes"):
        return True
    if override in ("0", "false", "no"):
        return False
    if override:
        raise ModelLoadError(f"{CPU_BF16_ENV}={override!r}: use 1 (native bf16) or 0 (emulated)")
    return _this_cpu_has_bf16()


@functools.cache
def _this_cpu_has_bf16() -> bool:
    try:
        return _flags_have_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def _flags_have_bf16(cpuinfo: str) -> bool:
    flags = set(re.findall(r"[\w.]+", " ".join(re.findall(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.M))))
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _build_on_meta(architecture: Architecture, checkpoint: Checkpoint) -> nn.Module:
    try:
        with torch.device("meta"):
            return architecture.build(checkpoint.config)
    except ConfigError as error:
        raise ModelLoadError(f"{checkpoint.path / CONFIG_FILE}: {error}") from None


def _check_names_and_shapes(
    model: nn.Module,
    checkpoint: Checkpoint,
    architecture: Architecture,
    stored_quantization: Quantization | None = None,
    quantized: Sequence[str] = (),
) -> None:
    """Refuse before reading any data if a tensor is missing, unexpected or of the wrong shape
    (for a quantized checkpoint: the quantized layers' tensors as bitsandbytes writes them)."""
    plain = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected: dict[str, tuple[int, ...] | None] = dict(plain)
    required = {name for name, _ in model.named_parameters()}  # tied aliases appear once
    if stored_quantization is not None:
        for name in quantized:
            shape = plain[f"{name}.weight"]  # (out_features, in_features)
            keys = quantized_weight_keys(stored_quantization, name, (shape[0], shape[1]))
            expected.update(keys)
            required |= set(keys) - {f"{name}.weight_format"}
    stored = checkpoint.tensor_shapes()
    ignored = [re.compile(pattern) for pattern in architecture.ignored_keys]
    problems = [f"missing tensor {name!r} (shape {_listed(expected[name])})" for name in sorted(required - set(stored))]
    for name, (file, shape) in sorted(stored.items()):
        if name not in expected:
            if not any(p.search(name) for p in ignored):
                problems.append(f"unexpected tensor {name!r} in {file.name}")
        elif expected[name] is not None and shape != expected[name]:
            implied = _listed(expected[name])
            problems.append(
                f"tensor {name!r} in {file.name} has shape {list(shape)}, but config.json implies {implied}"
            )
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ModelLoadError(
            f"{checkpoint.path} does not match model_type {checkpoint.model_type!r} as config.json describes it:"
            f"\n  {listed}{more}\nCheck that config.json and the weights come from the same model."
        )


def _listed(shape: tuple[int, ...] | None) -> str:
    return "any" if shape is None else str(list(shape))


def _fill_weights(model: nn.Module, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
    expected = model.state_dict().keys()
    state = {name: tensor for name, tensor in checkpoint.tensors(device, dtype) if name in expected}
    for alias, source in _tied_aliases(model).items():
        state.setdefault(alias, state[source])
    model.load_state_dict(state, strict=True, assign=True)


def _fill_prequantized(
    model: nn.Module,
    checkpoint: Checkpoint,
    plan: Quantization,
    quantized: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """The quantized layers from their stored tensors, everything else as `_fill_weights` does."""
    prefixes = tuple(f"{name}." for name in quantized)

    def quantized_data(name: str) -> bool:  # a quantized layer's weight and statistics, not its bias
        return name.startswith(prefixes) and not name.endswith(".bias")

    expected = model.state_dict().keys()
    tensors = checkpoint.tensors(device, dtype, as_stored=quantized_data)
    state = {name: tensor for name, tensor in tensors if name in expected or quantized_data(name)}
    load_quantized_layers(model, plan, quantized, state, device)
    for alias, source in _tied_aliases(model).items():
        state.setdefault(alias, state[source])
    model.load_state_dict(state, strict=False, assign=True)
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise ModelLoadError(f"{checkpoint.path}: tensors not filled from the checkpoint: {left[:_MAX_LISTED]}")


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Second names of shared parameters (tied embeddings) -> the name that owns the tensor."""
    owner: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owner:
            aliases[name] = owner[id(param)]
        else:
            owner[id(param)] = name
    return aliases


def _load_remote(
    checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, trust_remote_code: bool
) -> nn.Module:
    supported = ", ".join(supported_model_types())
    if "auto_map" not in checkpoint.config:
        raise ModelLoadError(
            f"{checkpoint.path / CONFIG_FILE}: model_type {checkpoint.model_type!r} is not supported "
            f"(native: {supported}) and the checkpoint ships no modeling code (no 'auto_map')"
        )
    if not trust_remote_code:
        raise ModelLoadError(
            f"{checkpoint.path / CONFIG_FILE}: model_type {checkpoint.model_type!r} has no native vdiff "
            f"implementation (native: {supported}). The checkpoint ships its own modeling code; pass "
            "--trust-remote-code (trust_remote_code=True) to run it, after reading it."
        )
    from vdiff.models.remote import RemoteCodeModel

    return RemoteCodeModel.load(checkpoint, device, dtype)
