"""bitsandbytes quantization: a transform of the loaded plain model; bnb checkpoints as published.

The model files do not change. Quantizing swaps the `nn.Linear` modules of the blocks for
bitsandbytes' layers (LLM.int8's `Linear8bitLt`, or `Linear4bit` with NF4 or FP4); embeddings,
norms and the LM head stay as they are. A checkpoint whose config.json carries a bitsandbytes
`quantization_config` (as transformers' `save_pretrained` writes it) holds those layers' tensors,
which are loaded into the same layers without quantizing again.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

from vdiff.models.checkpoint import CONFIG_FILE, Checkpoint, ModelLoadError

# vLLM's --quantization names: "bitsandbytes" is 4-bit NF4 applied at load (or any bnb checkpoint)
METHODS = ("bitsandbytes", "bitsandbytes-8bit", "bitsandbytes-4bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda")  # where bitsandbytes 0.50 runs both methods
INSTALL_HINT = "pip install 'vdiff[quant]' (bitsandbytes 0.50)"
FOUR_BIT_FLAGS = "--bnb-4bit-quant-type and --bnb-4bit-compute-dtype"
# bitsandbytes logs these on every 8-bit forward and at import on bf16 CPUs: the first is how
# LLM.int8 always computes, the second offers a kernel fetched from the Hub at run time.
_QUIET = (
    "MatMul8bitLt: inputs will be cast",
    "Failed to load CPU gemm_4bit_forward from kernels-community",
)


class _KnownNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET)


@dataclass(frozen=True)
class QuantizationFlags:
    """What the user asked for (`--quantization`, `--bnb-4bit-quant-type`,
    `--bnb-4bit-compute-dtype`); ValueError names the flag. `quant_type` None: NF4, or whatever
    a quantized checkpoint holds."""

    method: str
    quant_type: str | None = None
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            known = ", ".join(METHODS)
            raise ValueError(f"--quantization {self.method!r} is not supported (use {known})")
        if self.quant_type is not None and self.quant_type not in QUANT_TYPES:
            known = ", ".join(QUANT_TYPES)
            raise ValueError(f"--bnb-4bit-quant-type {self.quant_type!r} is not one of {known}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            known = ", ".join(COMPUTE_DTYPES)
            asked = self.compute_dtype
            raise ValueError(f"--bnb-4bit-compute-dtype {asked!r} is not one of {known}")
        four_bit_options = self.quant_type is not None or self.compute_dtype != "auto"
        if self.method == "bitsandbytes-8bit" and four_bit_options:
            raise ValueError(f"{FOUR_BIT_FLAGS} apply to 4-bit quantization only")

    @classmethod
    def parse(
        cls, method: str | None, quant_type: str | None = None, compute_dtype: str = "auto"
    ) -> QuantizationFlags | None:
        """The flags as given; no method and no 4-bit option means no quantization."""
        if not method:
            if quant_type or compute_dtype != "auto":
                raise ValueError(f"{FOUR_BIT_FLAGS} need --quantization")
            return None
        return cls(method, quant_type or None, compute_dtype or "auto")

    def quantization(self) -> Quantization:
        """The quantization to apply to a plain checkpoint."""
        if self.method == "bitsandbytes-8bit":
            return Quantization(bits=8)
        quant_type = self.quant_type or "nf4"
        return Quantization(bits=4, quant_type=quant_type, compute_dtype=self.compute_dtype)

    def accepts(self, stored: Quantization) -> bool:
        """Whether these flags describe a checkpoint already quantized as `stored`."""
        if self.method == "bitsandbytes":  # vLLM's name for any bitsandbytes checkpoint
            return self.quant_type in (None, stored.quant_type)
        bits = 8 if self.method == "bitsandbytes-8bit" else 4
        return bits == stored.bits and (bits == 8 or self.quant_type in (None, stored.quant_type))


@dataclass(frozen=True)
class Quantization:
    """One bitsandbytes setting: what the linear layers become."""

    bits: int  # 8: LLM.int8 (Linear8bitLt); 4: Linear4bit
    quant_type: str = "nf4"  # 4-bit: nf4 or fp4
    compute_dtype: str = "auto"  # 4-bit matrix products; auto: the activations' dtype
    double_quant: bool = False  # 4-bit: the block scales quantized too (bnb_4bit_use_double_quant)
    threshold: float = 6.0  # 8-bit: activation outlier threshold (llm_int8_threshold)
    skip_modules: tuple[str, ...] = ()  # module names, or their last part, kept unquantized
    prequantized: bool = False  # the checkpoint holds the quantized tensors

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits, not {self.bits}")
        if self.quant_type not in QUANT_TYPES:
            known = ", ".join(QUANT_TYPES)
            raise ValueError(f"4-bit quant type {self.quant_type!r} is not one of {known}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            known = ", ".join(COMPUTE_DTYPES)
            raise ValueError(f"4-bit compute dtype {self.compute_dtype!r} is not one of {known}")

    @property
    def method(self) -> str:
        return f"bitsandbytes-{self.bits}bit"

    def describe(self) -> str:
        if self.bits == 8:
            return "bitsandbytes 8-bit (LLM.int8)"
        compute = "the model's dtype" if self.compute_dtype == "auto" else self.compute_dtype
        double = ", double quantization" if self.double_quant else ""
        return f"bitsandbytes 4-bit {self.quant_type.upper()} (computing in {compute}{double})"

    def flags(self) -> QuantizationFlags:
        """The flags that name this method."""
        return QuantizationFlags(self.method, self.quant_type if self.bits == 4 else None)

    def keeps(self, name: str) -> bool:
        """Whether the module called `name` stays unquantized by this setting's skip list, by
        transformers' rule: the name itself, or a module it lies inside ("model.layers.0")."""
        return any(name == skip or f"{skip}." in name for skip in self.skip_modules)

    def hf_config(self, weights_dtype: torch.dtype) -> dict[str, Any]:
        """config.json's `quantization_config`, as transformers' BitsAndBytesConfig writes it."""
        four = self.bits == 4
        # 8-bit: BitsAndBytesConfig's default, which LLM.int8 never reads
        compute = (COMPUTE_DTYPES[self.compute_dtype] or weights_dtype) if four else torch.float32
        return {
            "_load_in_4bit": four,
            "_load_in_8bit": not four,
            "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": list(self.skip_modules) or None,
            "llm_int8_threshold": self.threshold,
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "quant_method": "bitsandbytes",
        }


def checkpoint_quantization(config: Mapping[str, Any], where: str) -> Quantization | None:
    """The quantization a checkpoint's config.json declares; ModelLoadError for what vdiff
    cannot load."""
    raw = config.get("quantization_config")
    if raw is None:
        return None
    method = raw.get("quant_method") if isinstance(raw, Mapping) else None
    if method != "bitsandbytes":
        unknown = f"quantization_config {method!r} is not supported"
        raise ModelLoadError(f"{where}: {unknown} (vdiff loads bitsandbytes)")
    eight, four = bool(raw.get("load_in_8bit")), bool(raw.get("load_in_4bit"))
    if eight == four:
        both = "must set exactly one of load_in_8bit and load_in_4bit"
        raise ModelLoadError(f"{where}: quantization_config {both}")
    storage = raw.get("bnb_4bit_quant_storage", "uint8")
    if four and storage != "uint8":
        unknown = f"bnb_4bit_quant_storage {storage!r} is not supported"
        raise ModelLoadError(f"{where}: {unknown} (uint8 is)")
    if eight and raw.get("llm_int8_has_fp16_weight"):
        training = "llm_int8_has_fp16_weight checkpoints (a training layout)"
        raise ModelLoadError(f"{where}: {training} are not supported")
    try:
        return Quantization(
            bits=4 if four else 8,
            quant_type=raw.get("bnb_4bit_quant_type") or "nf4",
            compute_dtype=str(raw.get("bnb_4bit_compute_dtype") or "auto").removeprefix("torch."),
            double_quant=bool(raw.get("bnb_4bit_use_double_quant")),
            threshold=float(raw.get("llm_int8_threshold", 6.0)),
            skip_modules=tuple(raw.get("llm_int8_skip_modules") or ()),
            prequantized=True,
        )
    except ValueError as error:
        raise ModelLoadError(f"{where}: quantization_config: {error}") from None


def plan_for_checkpoint(
    checkpoint: Checkpoint,
    requested: QuantizationFlags | Quantization | None,
    device: torch.device,
) -> Quantization | None:
    """`plan_quantization` for a checkpoint: its own quantization_config against the request."""
    where = str(checkpoint.path / CONFIG_FILE)
    stored = checkpoint_quantization(checkpoint.config, where)
    return plan_quantization(requested, stored, device, where)


def plan_quantization(
    requested: QuantizationFlags | Quantization | None,
    stored: Quantization | None,
    device: torch.device,
    where: str,
) -> Quantization | None:
    """What to load: the checkpoint's own quantization, or the requested one applied at load
    (the flags' or, from Python, a `Quantization` with every setting).

    Refused: a request that contradicts a quantized checkpoint, a device bitsandbytes cannot run
    on, and any quantization without bitsandbytes installed."""
    flags = requested.flags() if isinstance(requested, Quantization) else requested
    if stored is not None and flags is not None and not flags.accepts(stored):
        asked = f"--quantization {flags.method}"
        asked += f" --bnb-4bit-quant-type {flags.quant_type}" if flags.quant_type else ""
        raise ModelLoadError(
            f"{where} is already quantized ({stored.describe()}); {asked} asks for another "
            "method. Drop the flag, or load an unquantized checkpoint."
        )
    if isinstance(requested, QuantizationFlags):
        requested = requested.quantization()
    plan = stored or requested
    if plan is None:
        return None
    if device.type not in DEVICES:
        where_not = f"does not run on {device.type}"
        raise ModelLoadError(f"{plan.describe()} {where_not} (bitsandbytes runs on cpu and cuda)")
    bitsandbytes()
    return plan


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module, or ModelLoadError saying how to install it."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNotices) for f in logger.filters):
            logger.addFilter(_KnownNotices())
    try:
        return importlib.import_module("bitsandbytes")
    except ModuleNotFoundError as error:
        if error.name != "bitsandbytes":
            raise _unimportable(error) from None
        missing = "quantization needs the bitsandbytes package, which is not installed"
        raise ModelLoadError(f"{missing}: {INSTALL_HINT}") from None
    except (ImportError, OSError, RuntimeError) as error:  # a broken install or native library
        raise _unimportable(error) from None


def _unimportable(error: Exception) -> ModelLoadError:
    return ModelLoadError(f"bitsandbytes cannot be imported ({error}): {INSTALL_HINT}")


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of the model is a bitsandbytes layer."""
    return any(type(module).__module__.startswith("bitsandbytes.") for module in model.modules())


def quantized_module_names(
    model: nn.Module,
    plan: Quantization,
    keep: Collection[str],
) -> list[str]:
    """Names of the `nn.Linear` modules the plan quantizes: all but `keep` (the LM head) and the
    plan's skip list."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name not in keep and not plan.keeps(name)
    ]


def quantize_linear_layers(
    model: nn.Module,
    plan: Quantization,
    names: Collection[str],
    device: torch.device,
) -> None:
    """Swap each named plain `nn.Linear` (weights on any device) for its bitsandbytes layer on
    `device`; quantizing happens in the move, so the device never holds the full-width weight."""
    for name in names:
        linear = cast(nn.Linear, model.get_submodule(name))
        layer = _empty_layer(linear, plan)
        # bitsandbytes quantizes int8 weights only on their way from the CPU
        data = linear.weight.data.cpu() if plan.bits == 8 else linear.weight.data
        layer.weight = _quantized_weight(data, plan, layer).to(device)
        _set_bias(layer, linear.bias, device)
        _replace(model, name, layer)


def load_quantized_layers(
    model: nn.Module,
    plan: Quantization,
    names: Collection[str],
    state: dict[str, torch.Tensor],
    device: torch.device,
) -> None:
    """Build each named layer from a quantized checkpoint's tensors, popping them from `state`:
    4-bit `weight` plus its `weight.*` statistics, 8-bit `weight` plus `SCB` (row-major)."""
    bnb = bitsandbytes()
    for name in names:
        linear = model.get_submodule(name)
        layer = _empty_layer(linear, plan)
        data = state.pop(f"{name}.weight")
        if plan.bits == 4:
            prefix = f"{name}.weight."
            keys = [key for key in state if key.startswith(prefix)]
            stats = {key[len(prefix) :]: state.pop(key) for key in keys}
            weight = bnb.nn.Params4bit.from_prequantized(data, stats, device=device, module=layer)
            layer.weight = weight
        else:
            layout = state.pop(f"{name}.weight_format", None)
            if layout is not None and int(layout) != 0:
                not_row_major = f"8-bit weight_format {int(layout)} is not row-major (0)"
                raise ModelLoadError(f"{name}: {not_row_major}")
            weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
            weight.SCB = state.pop(f"{name}.SCB")
            layer.weight = weight.to(device)
        bias = state.pop(f"{name}.bias", None)
        _set_bias(layer, None if bias is None else nn.Parameter(bias, requires_grad=False), device)
        _replace(model, name, layer)


def quantized_weight_keys(
    plan: Quantization,
    name: str,
    shape: tuple[int, int],
) -> dict[str, tuple[int, ...] | None]:
    """The checkpoint keys of one quantized layer besides its bias -> their shape (None: any)."""
    out_features, in_features = shape
    if plan.bits == 8:
        return {
            f"{name}.weight": shape,
            f"{name}.SCB": (out_features,),
            f"{name}.weight_format": (),
        }
    packed = ((out_features * in_features + 1) // 2, 1)  # two 4-bit values per uint8
    stats = ("absmax", "quant_map", f"quant_state.bitsandbytes__{plan.quant_type}")
    nested = ("nested_absmax", "nested_quant_map") if plan.double_quant else ()
    return {f"{name}.weight": packed, **{f"{name}.weight.{key}": None for key in stats + nested}}


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes the linear layers' weights occupy, quantization statistics included (biases not)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            total += weight.numel() * weight.element_size()
            state = getattr(weight, "quant_state", None)
            if state is not None:
                stats = state.as_dict(packed=True).values()
                total += sum(t.numel() * t.element_size() for t in stats)
            scales = getattr(weight, "SCB", None)
            if scales is None:
                scales = getattr(getattr(module, "state", None), "SCB", None)
            if scales is not None:
                total += scales.numel() * scales.element_size()
    return total


def _empty_layer(linear: nn.Module, plan: Quantization) -> nn.Module:
    bnb = bitsandbytes()
    bias = getattr(linear, "bias", None) is not None
    shape = (linear.in_features, linear.out_features)
    with torch.device("meta"):  # the weight is replaced; nothing is allocated for it
        if plan.bits == 8:
            return bnb.nn.Linear8bitLt(
                *shape,
                bias=bias,
                has_fp16_weights=False,
                threshold=plan.threshold,
            )
        compute = COMPUTE_DTYPES[plan.compute_dtype]
        return bnb.nn.Linear4bit(
            *shape,
            bias=bias,
            compute_dtype=compute,
            compress_statistics=plan.double_quant,
            quant_type=plan.quant_type,
            quant_storage=torch.uint8,
        )


def _quantized_weight(data: torch.Tensor, plan: Quantization, layer: nn.Module) -> nn.Parameter:
    bnb = bitsandbytes()
    if plan.bits == 8:
        weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
        return cast(nn.Parameter, weight)
    return cast(
        nn.Parameter,
        bnb.nn.Params4bit(
            data,
            requires_grad=False,
            compress_statistics=plan.double_quant,
            quant_type=plan.quant_type,
            quant_storage=torch.uint8,
            module=layer,
        ),
    )


def _set_bias(layer: nn.Module, bias: torch.Tensor | None, device: torch.device) -> None:
    moved = None if bias is None else nn.Parameter(bias.data.to(device), requires_grad=False)
    layer.register_parameter("bias", moved)


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
