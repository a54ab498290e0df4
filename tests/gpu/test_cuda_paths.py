"""Every CUDA-only path of vdiff against the path CPU tests already check, on the tiny checkpoints.

CUDA changes which kernels run, not what vdiff computes, so each test compares a CUDA path with
its SDPA or CPU counterpart (or with itself in another batch) within a stated tolerance:
- flash-attn's dense and varlen kernels (vdiff/models/layers.py) against SDPA;
- the KV-cached and windowed rows (vdiff/kv_cache.py: Fast-dLLM's prefix and dual cache, APD's
  window) against full forwards, alone and in a padded batch;
- per-request torch.Generators on the GPU: a seed repeats its tokens, whoever shares the batch;
- bitsandbytes 8-bit and NF4 on CUDA: near the bf16 logits, and a checkpoint quantized on the
  CPU loads as the same layers that quantizing at load on the GPU builds;
- batch-invariant mode: a request's tokens and forward count alone equal those among 16.

Marked `gpu`: tests/conftest.py skips them where torch sees no CUDA device (the skipif below says
the same when this file runs without that conftest). perf/gpu_check.sh runs them on a GPU box.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from engine_harness import run_joining
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

import vdiff.models.layers as layers
from conftest import LOGIT_RTOL, write_tiny
from vdiff import LLM, SamplingParams
from vdiff.kv_cache import BatchKV, RequestKV, Window
from vdiff.models import load_model
from vdiff.models.layers import AttentionMask, attend
from vdiff.models.quantization import QuantizationFlags

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NO_FLASH = "flash-attn is not installed (pip install 'vdiff[gpu]'); CUDA attention runs SDPA"
NO_BNB = "bitsandbytes is not installed (pip install 'vdiff[quant]')"
# flash-attn against SDPA on the same bf16/fp16 inputs: both accumulate in float32 and round the
# probabilities and the output to the input dtype, so they differ by a few of its last bits
# (bf16: 2^-8 relative, fp16: 2^-11). Attention outputs of unit-scale inputs are O(1).
ATTENTION_ATOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Model logits through two layers: bf16 logits sit within 0.8% of float32's largest |logit| (CPU,
# tiny models); a kernel swap may move them by about as much again.
FLASH_LOGIT_RTOL = 2e-2
# Same shapes, same kernels: a refresh differs from the full forward at most by the cache's
# memory layout (its keys are a contiguous copy), i.e. not beyond the last bits.
REFRESH_RTOL = 1e-3
# Relative Frobenius error of quantized logits against the same model in bf16: the bounds of the
# CPU tests (tests/models/test_quantization.py, measured there at 0.015-0.027 and 0.12-0.14).
# bitsandbytes runs the same algorithms on CUDA (LLM.int8: int8 activations with fp16 outliers;
# NF4: blockwise codes), so the error is the format's, not the device's.
QUANT_REL_ERROR = {"bitsandbytes-8bit": 0.04, "bitsandbytes-4bit": 0.17}
# bf16 logits of a row batched against alone, relative Frobenius: 4x the 0.7% by which bf16
# logits of these checkpoints differ from float32's (CPU), room for another attention kernel.
BATCH_BF16_REL_ERROR = 3e-2
# A checkpoint quantized by bitsandbytes' CPU kernels against its CUDA kernels quantizing the
# same bf16 weights: a value at a rounding boundary may land one code apart, no more.
CODE_MISMATCH_FRACTION = 1e-3
PROMPT = [17, 42, 99, 7, 256, 31, 5]


def prompt_ids(length: int, seed: int) -> Tensor:
    return torch.randint(0, 380, (1, length), generator=torch.Generator().manual_seed(seed))


def relative_error(value: Tensor, reference: Tensor) -> float:
    """||value - reference||_F / ||reference||_F, in float32."""
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def scaled_atol(rtol: float, reference: Tensor) -> float:
    """A tolerance relative to the largest |logit|, as the default mode states its own."""
    return rtol * float(reference.float().abs().max())


def assert_logits_close(value: Tensor, reference: Tensor, rtol: float) -> None:
    """|value - reference| <= rtol * max |reference| everywhere."""
    atol = scaled_atol(rtol, reference)
    torch.testing.assert_close(value.float(), reference.float(), atol=atol, rtol=0)


# ---------------------------------------------------------------- flash-attn against SDPA


class FlashCalls:
    """Wraps vdiff's flash-attn functions to count calls: a test that means to exercise the
    dense or the varlen kernel fails if the dispatch in `attend` sent it elsewhere."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        functions = layers.flash_attn_functions()
        assert functions is not None
        dense, varlen = functions
        self.dense = self.varlen = 0

        def counted_dense(*args: Any, **kwargs: Any) -> Tensor:
            self.dense += 1
            return dense(*args, **kwargs)

        def counted_varlen(*args: Any, **kwargs: Any) -> Tensor:
            self.varlen += 1
            return varlen(*args, **kwargs)

        monkeypatch.setattr(layers, "flash_attn_functions", lambda: (counted_dense, counted_varlen))


@pytest.fixture
def flash(monkeypatch: pytest.MonkeyPatch) -> FlashCalls:
    pytest.importorskip("flash_attn", reason=NO_FLASH)
    return FlashCalls(monkeypatch)


def sdpa_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "_can_use_flash", lambda *args: False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "varlen"])
def test_flash_attention_equals_sdpa(
    flash: FlashCalls,
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    padded: bool,
) -> None:
    """`attend` on CUDA: rows of equal length take flash-attn's dense kernel, right-padded rows
    its varlen kernel on the packed real tokens; both equal SDPA with the key mask on every real
    query row. Padded query rows come back as zeros (nothing reads them)."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    lengths = [40, 40, 40] if not padded else [40, 33, 5]
    q, k, v = (
        torch.randn(3, count, 40, 32, generator=generator, device=DEVICE, dtype=dtype)
        for count in (heads, kv_heads, kv_heads)
    )
    keep = torch.arange(40, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]
    mask = AttentionMask(keep=keep) if padded else AttentionMask()
    assert layers._can_use_flash(q, k, mask)
    with_flash = attend(q, k, v, mask)
    assert (flash.dense, flash.varlen) == ((0, 1) if padded else (1, 0))
    sdpa_only(monkeypatch)
    with_sdpa = attend(q, k, v, mask)
    for row, length in enumerate(lengths):
        real_flash, real_sdpa = (
            with_flash[row, :, :length].float(),
            with_sdpa[row, :, :length].float(),
        )
        atol = ATTENTION_ATOL[dtype]
        torch.testing.assert_close(real_flash, real_sdpa, atol=atol, rtol=atol)
        assert not with_flash[row, :, length:].any(), "padded query rows are zeros"


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "varlen"])
def test_flash_model_logits_equal_sdpa(
    tiny_model_dir: Path, flash: FlashCalls, monkeypatch: pytest.MonkeyPatch, padded: bool
) -> None:
    """Whole bf16 forwards (LLaDA: MHA; Dream: GQA and QKV biases) with flash-attn and with SDPA
    on the same rows: logits within FLASH_LOGIT_RTOL of the largest |logit|, and flash no further
    from the float32 forward than twice SDPA's bf16 error."""
    model = load_model(tiny_model_dir, dtype="bfloat16", device=DEVICE)
    ids = torch.cat([prompt_ids(24, seed=10), prompt_ids(24, seed=11)]).to(DEVICE)
    real = [24, 17] if padded else [24, 24]
    mask = (torch.arange(24) < torch.tensor(real)[:, None]).long().to(DEVICE) if padded else None
    with torch.inference_mode():
        with_flash = model(ids, attention_mask=mask).logits
        assert (flash.dense, flash.varlen) == ((0, 2) if padded else (2, 0))  # one call per layer
        exact_model = load_model(tiny_model_dir, dtype="float32", device=DEVICE)
        reference = exact_model(ids, attention_mask=mask).logits
        sdpa_only(monkeypatch)
        with_sdpa = model(ids, attention_mask=mask).logits
    for row, length in enumerate(real):
        fast, slow, exact = (
            with_flash[row, :length],
            with_sdpa[row, :length],
            reference[row, :length],
        )
        assert_logits_close(fast, slow, FLASH_LOGIT_RTOL)
        assert relative_error(fast, exact) <= 2 * relative_error(slow, exact) + 1e-3


# ---------------------------------------------------------------- KV-cached and windowed rows


def cached_windows(mode: str, length: int) -> tuple[Window, Window]:
    """(refresh, later window) of one canvas: Fast-dLLM's prefix cache feeds the block and all
    after it, the dual cache the block alone, APD feeds its lookahead and attends up to its end."""
    if mode == "apd":
        return Window(0, 17, length, key_end=17), Window(11, 17, length, key_end=17)
    end = length if mode == "prefix" else 15
    return Window(0, length, length), Window(11, end, length)


@pytest.mark.parametrize("mode", ["prefix", "dual", "apd"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_window_of_an_unchanged_canvas_scores_the_full_forward(
    tiny_model_dir: Path, dtype: str, mode: str
) -> None:
    """tests/engine/test_kv_cache.py's claim on CUDA (flash-attn, when installed, runs the refresh,
    whose queries and keys are the whole canvas; SDPA the window): the refresh equals the full
    forward within REFRESH_RTOL, the window within the default mode's stated LOGIT_RTOL. APD's
    window attends to keys up to its lookahead end: the forward of that prefix alone."""
    model = load_model(tiny_model_dir, dtype=dtype, device=DEVICE)
    mask_id = cast(Any, model).config.mask_token_id
    canvas = torch.tensor([PROMPT + [mask_id] * 16], device=DEVICE)  # (1, 23)
    canvas[0, 9] = 60  # a committed answer token, so the window is not all masks
    refresh, window = cached_windows(mode, canvas.shape[1])
    kv = RequestKV()
    with torch.inference_mode():
        full = model(canvas[:, : refresh.key_len]).logits
        fed = canvas[:, : refresh.end]
        refreshed = model(fed, position_ids=positions(refresh), kv=BatchKV([kv], [refresh], DEVICE))
        fed = canvas[:, window.start : window.end]
        cached = model(fed, position_ids=positions(window), kv=BatchKV([kv], [window], DEVICE))
    assert_logits_close(refreshed.logits, full, REFRESH_RTOL)
    assert_logits_close(cached.logits, full[:, window.start : window.end], LOGIT_RTOL[dtype])


def positions(window: Window) -> Tensor:
    return torch.arange(window.start, window.end, device=DEVICE)[None]


def cached_forward(
    model: nn.Module, canvases: list[Tensor], windows: list[Window], caches: list[RequestKV | None]
) -> Tensor:
    """(R, Q, V) logits of one cached forward, its rows packed as the runner packs them: each
    window right-padded with the pad id, at its absolute positions, over a private copy of its
    cache (a forward writes its window into the cache it is given)."""
    pairs = zip(canvases, windows, strict=True)
    pad_id = cast(Any, model).config.pad_token_id
    fed = pad_sequence([c[w.start : w.end] for c, w in pairs], True, pad_id)
    places = pad_sequence([positions(w)[0] for w in windows], batch_first=True)
    kv = BatchKV([fresh_or(kv) for kv in caches], windows, DEVICE)
    return model(fed, position_ids=places, kv=kv).logits


def fresh_or(kv: RequestKV | None) -> RequestKV:
    """A copy of a refreshed cache, or a new one for a row that refreshes."""
    if kv is None:
        return RequestKV()
    return RequestKV([k.clone() for k in kv.keys], [v.clone() for v in kv.values])


def refreshed_cache(model: nn.Module, canvas: Tensor) -> RequestKV:
    """A cache refreshed over the whole canvas, as a request's first cached step leaves it."""
    kv, whole = RequestKV(), Window(0, canvas.shape[0], canvas.shape[0])
    model(canvas[None], position_ids=positions(whole), kv=BatchKV([kv], [whole], DEVICE))
    return kv


# Rows of one cached forward: (canvas length, window start, window end); None marks a refresh.
# "equal": 24 queries (the refresh) and 24 keys, one row's keys padded: equal query and key
# counts send the key mask to flash-attn's varlen kernel. "longer": 30 keys, SDPA.
BATCHES = {
    "equal": [(24, None, None), (16, 4, 12)],
    "longer": [(24, None, None), (16, 4, 12), (30, 26, 30)],
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_of_cached_windows_equals_each_row_alone(
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    dtype: str,
    batch: str,
) -> None:
    """What the runner's windowed forward does with a step's cached requests: windows of other
    lengths right-padded, keys padded to the longest canvas and masked. Each row's logits equal
    that row's forward alone within the default mode's stated LOGIT_RTOL, and in bf16 within
    BATCH_BF16_REL_ERROR (relative Frobenius), which a misplaced key mask would exceed. Where
    flash-attn is installed, "equal" in bf16 must take its varlen kernel."""
    model = load_model(tiny_model_dir, dtype=dtype, device=DEVICE)
    flash = None
    if dtype == "bfloat16" and batch == "equal" and layers.flash_attn_functions() is not None:
        flash = FlashCalls(monkeypatch)
    rows = BATCHES[batch]
    canvases = [prompt_ids(n, seed=20 + i)[0].to(DEVICE) for i, (n, _, _) in enumerate(rows)]
    windows = [Window(0, n, n) if a is None or b is None else Window(a, b, n) for n, a, b in rows]
    with torch.inference_mode():
        caches = [
            None if a is None else refreshed_cache(model, canvas)
            for canvas, (_, a, _) in zip(canvases, rows, strict=True)
        ]
        together = cached_forward(model, canvases, windows, caches)
        assert flash is None or flash.varlen == 2  # once per layer
        for row, window in enumerate(windows):
            one = slice(row, row + 1)
            alone = cached_forward(model, canvases[one], [window], caches[one])[0]
            assert_logits_close(together[row, : window.length], alone, LOGIT_RTOL[dtype])
            if dtype == "bfloat16":
                assert relative_error(together[row, : window.length], alone) < BATCH_BF16_REL_ERROR


# ---------------------------------------------------------------- engines on CUDA


@pytest.fixture(scope="session")
def cuda_engines(
    tiny_llada: Path, tiny_llada_verifier: Path, tiny_dream: Path, tiny_dream_verifier: Path
) -> Callable[..., LLM]:
    """`cuda_engines(family, dtype, batch_invariant)`: one LLM per setting on the GPU for the run,
    each with its tiny verifier (APD)."""
    models = {
        "llada": (tiny_llada, tiny_llada_verifier),
        "dream": (tiny_dream, tiny_dream_verifier),
    }
    built: dict[tuple[str, str, bool], LLM] = {}

    def get(family: str, dtype: str, batch_invariant: bool) -> LLM:
        key = (family, dtype, batch_invariant)
        if key not in built:
            model, verifier = models[family]
            built[key] = LLM(
                model=model, verifier=str(verifier), dtype=dtype, device=DEVICE,
                max_num_seqs=16, batch_invariant=batch_invariant,
            )  # fmt: skip
        return built[key]

    return get


def sampled(algorithm: str) -> SamplingParams:
    """A request drawn at temperature 0.9 (top-p 0.95): its tokens come from its generator."""
    return SamplingParams(
        max_tokens=16,
        steps=16,
        temperature=0.9,
        top_p=0.95,
        algorithm=algorithm,
        full_canvas=True,
    )


SAMPLED = [
    ("llada", "low_confidence"),
    ("llada", "random"),
    ("dream", "origin"),
    ("dream", "entropy"),
]


@pytest.mark.parametrize(("family", "algorithm"), SAMPLED)
def test_a_seed_repeats_its_tokens_on_cuda(
    cuda_engines: Callable[..., LLM],
    family: str,
    algorithm: str,
) -> None:
    """Default mode, temperature 0.9: the request's generator lives on the GPU, and the same seed
    draws the same tokens again (same shapes, same kernels, same generator state); another seed
    draws others."""
    llm = cuda_engines(family, "bfloat16", False)
    params = sampled(algorithm)
    engine = llm.engine
    engine.add_request(PROMPT, params.replace(seed=1234), request_id="probe")
    assert engine._requests["probe"].generator.device.type == "cuda"
    engine.abort("probe")
    engine.step()
    first = llm.generate([PROMPT], params.replace(seed=1234))[0].token_ids
    again = llm.generate([PROMPT], params.replace(seed=1234))[0].token_ids
    other = llm.generate([PROMPT], params.replace(seed=99))[0].token_ids
    assert first == again
    assert first != other


@pytest.mark.parametrize(("family", "algorithm"), SAMPLED)
def test_a_seed_fixes_its_tokens_whoever_shares_the_batch_on_cuda(
    cuda_engines: Callable[..., LLM], family: str, algorithm: str
) -> None:
    """tests/engine/test_engine.py's claim on CUDA: in batch-invariant mode a seeded sampled
    request draws from its own generator and sees its own logits' bits, so its neighbours
    (other prompts, unseeded) change none of its tokens."""
    llm = cuda_engines(family, "bfloat16", True)
    params = sampled(algorithm)
    alone = llm.generate([PROMPT], params.replace(seed=1234))[0].token_ids
    crowd = [
        (PROMPT, params.replace(seed=1234)),
        ([9] * 12, params),
        ([4, 5], params),
        (PROMPT, params),
    ]
    together = run_joining(llm, crowd, [0, 0, 1, 3])["r0"].token_ids
    assert together == alone


def mixed_request(rng: random.Random, family: str, index: int) -> tuple[list[int], SamplingParams]:
    """One request of any algorithm the family runs (schedules, threshold, factor, prefix and dual
    caches, CFG, APD with and without its KV window), at temperature 0 or 0.8 with a seed."""
    length = rng.choice([8, 16, 24])
    fields: dict[str, Any] = {"max_tokens": length, "full_canvas": True, "seed": index}
    fields["temperature"] = rng.choice([0.0, 0.0, 0.8])
    kind = rng.choice(["schedule", "threshold", "factor", "cache", "cfg", "apd", "own"])
    if kind == "apd":
        fields |= {"algorithm": "apd", "apd_mixture_weight": rng.choice([0.5, 0.9])}
        fields |= {
            "apd_kv_window": rng.choice([None, 2, 4]),
            "apd_max_lookahead": rng.choice([None, 5]),
        }
    elif kind == "own" and family == "dream":
        fields |= {
            "steps": length // rng.choice([1, 2]),
            "algorithm": rng.choice(DREAM_ALGORITHMS),
        }
    else:  # LLaDA's algorithms, which decode either family
        fields |= {"algorithm": rng.choice(["low_confidence", "random"]), "block_length": 8}
        if kind == "threshold":
            fields["threshold"] = rng.choice([0.03, 0.1])
        elif kind == "factor":
            fields["factor"] = 2.95
        else:
            fields["steps"] = length // rng.choice([1, 2])
        if kind == "cache":
            fields["cache"] = rng.choice(["prefix", "dual"])
        elif kind == "cfg":
            fields["cfg_scale"] = 1.0
    prompt = [rng.randrange(1, 380) for _ in range(rng.randrange(1, 40))]
    return prompt, SamplingParams(**fields)


DREAM_ALGORITHMS = ["origin", "maskgit_plus", "topk_margin", "entropy"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_batch_invariant_request_alone_equals_it_among_16(
    cuda_engines: Callable[..., LLM], family: str, dtype: str
) -> None:
    """Batch-invariant mode on CUDA: 16 requests of mixed algorithms, some joining a few steps
    late; each one's tokens and forward count equal its run alone, bit for bit. By design: every
    row runs fixed 64-row tiles through the matrix products and attends alone, on exactly its own
    queries and keys (flash-attn's dense kernel where installed), and the strategies take one
    request at a time with its own generator."""
    llm = cuda_engines(family, dtype, True)
    rng = random.Random(16)
    requests = [mixed_request(rng, family, i) for i in range(16)]
    delays = [0] * 12 + [1, 2, 4, 6]
    together = run_joining(llm, requests, delays)
    for i, (prompt, params) in enumerate(requests):
        alone = llm.generate([prompt], params)[0]
        assert (together[f"r{i}"].token_ids, together[f"r{i}"].nfe) == (
            alone.token_ids,
            alone.nfe,
        ), params


# ---------------------------------------------------------------- bitsandbytes on CUDA


@pytest.fixture
def bnb() -> Any:
    return pytest.importorskip("bitsandbytes", reason=NO_BNB)


@pytest.fixture(scope="session")
def prequantized(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """`prequantized(arch, bits)`: the tiny checkpoint (same seed, same bf16 weights as the
    session's) quantized by make_tiny_model.py --quantize, i.e. by bitsandbytes on the CPU."""
    written: dict[tuple[str, str], Path] = {}

    def get(arch: str, bits: str) -> Path:
        if (arch, bits) not in written:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{bits}")
            written[arch, bits] = write_tiny(out, arch, "--quantize", bits)
        return written[arch, bits]

    return get


def load_quantized(path: Path, method: str) -> nn.Module:
    """The plain bf16 checkpoint, quantized at load on the GPU."""
    return load_model(path, dtype="bfloat16", device=DEVICE, quantization=QuantizationFlags(method))


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if type(module).__module__.startswith("bitsandbytes."):
            yield name, module


@pytest.mark.parametrize("method", ["bitsandbytes-8bit", "bitsandbytes-4bit"])
def test_quantized_logits_stay_near_bf16_on_cuda(
    bnb: Any,
    tiny_model_dir: Path,
    method: str,
) -> None:
    """Quantizing at load on CUDA: the blocks' linear layers become bitsandbytes layers on the
    GPU, and the logits stay within QUANT_REL_ERROR (relative Frobenius) of the bf16 model's."""
    plain = load_model(tiny_model_dir, dtype="bfloat16", device=DEVICE)
    model = load_quantized(tiny_model_dir, method)
    layers_found = list(quantized_layers(model))
    assert layers_found and all(m.weight.device.type == "cuda" for _, m in layers_found)
    ids = torch.cat([prompt_ids(24, seed=30), prompt_ids(24, seed=31)]).to(DEVICE)
    with torch.inference_mode():
        reference, quantized = plain(ids).logits, model(ids).logits
    assert torch.isfinite(quantized).all()
    assert 1e-4 < relative_error(quantized, reference) < QUANT_REL_ERROR[method]


def stored_codes(module: nn.Module) -> tuple[Tensor, Tensor]:
    """A quantized layer's codes and scales as loaded: 8-bit (int8 rows, per-row absmax SCB);
    4-bit (one code index per weight, unpacked from two per byte, and the per-block absmax)."""
    weight: Any = module.weight
    if weight.dtype == torch.int8:
        state = cast(Any, module).state  # where the scales move at the first forward
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
        return weight.data.to(torch.int16), scales.float()
    packed = weight.data.view(torch.uint8).flatten().to(torch.int16)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten()
    return codes, weight.quant_state.absmax.float()


@pytest.mark.parametrize(
    ("bits", "method"),
    [("8bit", "bitsandbytes-8bit"), ("4bit", "bitsandbytes-4bit")],
)
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_prequantized_checkpoint_equals_quantize_at_load_on_cuda(
    bnb: Any, prequantized: Callable[[str, str], Path], tiny_llada: Path, tiny_dream: Path,
    arch: str, bits: str, method: str,
) -> None:  # fmt: skip
    """A bitsandbytes checkpoint (written on the CPU) loads onto the GPU as the same layers that
    quantizing the plain checkpoint at load on the GPU builds: the same scales, codes equal but
    for at most CODE_MISMATCH_FRACTION one step apart (bitsandbytes' CPU and CUDA kernels may
    round a boundary value apart), hence logits within that. Both then generate on the engine."""
    plain_dir = tiny_llada if arch == "llada" else tiny_dream
    stored = load_model(prequantized(arch, bits), dtype="bfloat16", device=DEVICE)
    at_load = load_quantized(plain_dir, method)
    pairs = list(zip(quantized_layers(stored), quantized_layers(at_load), strict=True))
    assert pairs
    for (name, left), (other, right) in pairs:
        assert name == other
        codes, scales = stored_codes(left)
        codes_at_load, scales_at_load = stored_codes(right)
        torch.testing.assert_close(scales, scales_at_load, rtol=1e-6, atol=0)
        apart = (codes - codes_at_load).abs()
        assert int(apart.max()) <= 1, name
        assert float((apart > 0).float().mean()) <= CODE_MISMATCH_FRACTION, name
    ids = torch.cat([prompt_ids(24, seed=32), prompt_ids(24, seed=33)]).to(DEVICE)
    with torch.inference_mode():
        assert relative_error(stored(ids).logits, at_load(ids).logits) <= 1e-2
    llm = LLM(model=prequantized(arch, bits), dtype="bfloat16", device=DEVICE, max_num_seqs=4)
    params = SamplingParams(max_tokens=16, steps=16, temperature=0.0, full_canvas=True)
    outputs = llm.generate([PROMPT, [9] * 12], params)
    assert [len(o.token_ids) for o in outputs] == [16, 16]


def test_cuda_bf16_forward_equals_the_cpu_float32_forward(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA forward with SDPA (what runs where flash-attn is missing, as on the GPU check's
    box): bf16 logits on the GPU within FLASH_LOGIT_RTOL of the largest |logit| of the float32
    forward on the CPU, unpadded and right-padded (keys masked); padded query rows stay finite."""
    sdpa_only(monkeypatch)
    ids = torch.cat([prompt_ids(24, seed=12), prompt_ids(24, seed=13)])
    padded = (torch.arange(24) < torch.tensor([24, 17])[:, None]).long()
    reference = load_model(tiny_model_dir, dtype="float32", device="cpu")
    model = load_model(tiny_model_dir, dtype="bfloat16", device=DEVICE)
    for mask, real in ((None, [24, 24]), (padded, [24, 17])):
        with torch.inference_mode():
            on_cpu = reference(ids, attention_mask=mask).logits
            on_device = None if mask is None else mask.to(DEVICE)
            on_gpu = model(ids.to(DEVICE), attention_mask=on_device).logits
        assert torch.isfinite(on_gpu).all()
        for row, length in enumerate(real):
            assert_logits_close(on_gpu[row, :length].cpu(), on_cpu[row, :length], FLASH_LOGIT_RTOL)
