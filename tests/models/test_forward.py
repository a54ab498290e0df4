"""Forward-pass behaviour of the native LLaDA and Dream implementations on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vdiff.models import canvas_logits, load_model
from vdiff.models.configs import DreamConfig
from vdiff.models.dream import DreamModel
from vdiff.models.layers import RMSNorm, Rotary
from vdiff.runner import head_on_rows

ATOL = 1e-5


def prompt_ids(length: int, seed: int = 0, high: int = 380) -> torch.Tensor:
    return torch.randint(0, high, (1, length), generator=torch.Generator().manual_seed(seed))


def test_forward_returns_hf_style_logits(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype="float32")
    ids = torch.cat([prompt_ids(9, seed=1), prompt_ids(9, seed=2)])
    out = model(ids)
    assert out.logits.shape == (2, 9, model.config.vocab_size)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def test_left_padded_row_matches_unpadded_row(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype="float32")
    pad_id, pads = model.config.pad_token_id, 5
    short, long = prompt_ids(7, seed=3), prompt_ids(12, seed=4)
    padded = torch.cat([torch.full((1, pads), pad_id), short], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.ones_like(batch)
    mask[0, :pads] = 0

    batched = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(batched[0, pads:], model(short).logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1], model(long).logits[0], atol=ATOL, rtol=0)
    assert torch.isfinite(batched[0, :pads]).all(), "padded query rows must stay finite (key-side masking)"
    unmasked = model(batch).logits
    assert not torch.allclose(unmasked[0, pads:], batched[0, pads:], atol=1e-3), "the mask must matter"


def test_bad_attention_masks_are_refused(tiny_llada: Path) -> None:
    model = load_model(tiny_llada, dtype="float32")
    ids = prompt_ids(4)
    with pytest.raises(ValueError, match="row with no real token"):
        model(ids, attention_mask=torch.zeros_like(ids))
    with pytest.raises(ValueError, match=r"attention_mask must be .* got shape \(1, 1, 4\)"):
        model(ids, attention_mask=torch.ones(1, 1, 4))


def test_attention_is_bidirectional(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype="float32")
    ids = prompt_ids(10, seed=5)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 380
    before, after = model(ids).logits, model(changed).logits
    assert not torch.allclose(before[0, 0], after[0, 0]), "position 0 must see the last token"


def test_dense_4d_mask_equals_padding_mask_on_real_rows(tiny_dream: Path) -> None:
    """Dream's reference sampler passes a 4D bool mask; real rows must match the 2D path."""
    model = load_model(tiny_dream, dtype="float32")
    keep = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]).bool()
    ids = prompt_ids(8, seed=6)
    dense = keep[:, None, None, :] & keep[:, None, :, None]  # (B, 1, L, L), both sides as in Dream
    torch.testing.assert_close(
        model(ids, attention_mask=dense).logits[0, 2:], model(ids, attention_mask=keep.long()).logits[0, 2:]
    )


def test_explicit_positions_equal_default_and_rope_is_relative(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype="float32")
    ids = prompt_ids(8, seed=7)
    positions = torch.arange(8)[None]
    base = model(ids).logits
    torch.testing.assert_close(model(ids, position_ids=positions).logits, base, atol=0, rtol=0)
    torch.testing.assert_close(model(ids, position_ids=positions + 17).logits, base, atol=1e-4, rtol=0)


def test_logit_shift_conventions(tiny_llada: Path, tiny_dream: Path) -> None:
    llada, dream = load_model(tiny_llada, dtype="float32"), load_model(tiny_dream, dtype="float32")
    assert llada.logits_shift == 0 and dream.logits_shift == 1
    ids = prompt_ids(6, seed=8)
    raw = dream(ids).logits
    shifted = canvas_logits(raw, dream.logits_shift)
    torch.testing.assert_close(shifted[:, 1:], raw[:, :-1], atol=0, rtol=0)  # row i scores position i
    torch.testing.assert_close(shifted[:, 0], raw[:, 0], atol=0, rtol=0)  # position 0 keeps its own row
    llada_raw = llada(ids).logits
    assert canvas_logits(llada_raw, llada.logits_shift) is llada_raw
    with pytest.raises(ValueError, match="logits_shift"):
        canvas_logits(raw, 2)


def test_grouped_query_attention_equals_expanded_heads(tiny_dream: Path) -> None:
    """GQA with K kv heads equals MHA whose kv projections repeat each kv head H/K times in place."""
    gqa = load_model(tiny_dream, dtype="float32")
    config = gqa.config
    assert config.num_key_value_heads < config.num_attention_heads
    mha = DreamModel(DreamConfig(**{**config.__dict__, "num_key_value_heads": config.num_attention_heads}))
    group, head_dim = config.num_attention_heads // config.num_key_value_heads, config.head_dim
    state = {}
    for name, tensor in gqa.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:  # (K*D, ...) -> (H*D, ...), kv head j serves q heads j*g..
            tensor = tensor.view(config.num_key_value_heads, head_dim, *tensor.shape[1:])
            tensor = tensor.repeat_interleave(group, dim=0).reshape(-1, *tensor.shape[2:])
        state[name] = tensor
    mha.load_state_dict(state)
    ids = prompt_ids(9, seed=9)
    torch.testing.assert_close(mha(ids).logits, gqa(ids).logits, atol=ATOL, rtol=0)


def test_rmsnorm_casts_before_the_weight_multiply() -> None:
    norm = RMSNorm(8, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def test_rope_precision_modes_differ_only_in_bf16() -> None:
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5)[None] * 997  # large angles make bf16 cos/sin visibly coarse
    full = Rotary.at(positions, 16, 500000.0, full_precision=True)
    cast = Rotary.at(positions, 16, 500000.0, full_precision=False)
    torch.testing.assert_close(full.apply(x), cast.apply(x), atol=0, rtol=0)  # identical in float32
    xb = x.to(torch.bfloat16)
    assert torch.equal(full.apply(xb), full.apply(xb.float()).to(torch.bfloat16))  # LLaDA: fp32 rotation, one cast
    assert not torch.equal(full.apply(xb), cast.apply(xb))  # Dream: rotate in bf16


@pytest.mark.gpu
def test_flash_attention_matches_sdpa_on_cuda(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flash_attn")
    import vdiff.models.layers as layers

    model = load_model(tiny_model_dir, dtype="bfloat16", device="cuda")
    ids = torch.cat([prompt_ids(16, seed=10), prompt_ids(16, seed=11)]).cuda()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with_flash = model(ids, attention_mask=mask).logits
    monkeypatch.setattr(layers, "_can_use_flash", lambda *args: False)
    with_sdpa = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(with_flash[0, 4:].float(), with_sdpa[0, 4:].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(with_flash[1].float(), with_sdpa[1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_head_on_a_few_rows_equals_the_whole_canvas_head(tiny_model_dir: Path, dtype: str) -> None:
    """What the engine relies on: logits of the rows a strategy reads, computed alone, are the bits
    of the whole-canvas head, for every row count (the runner's minimum row tile)."""
    model = load_model(tiny_model_dir, dtype=dtype, device="cpu")
    ids = torch.cat([prompt_ids(48, seed=11), prompt_ids(48, seed=12)]).view(2, 48)
    with torch.inference_mode():
        hidden = model.hidden_states(ids)  # (2, 48, D)
        full = model(ids).logits.reshape(96, -1)
        assert torch.equal(model.head(hidden).reshape(96, -1), full)
        flat = hidden.reshape(96, -1)
        generator = torch.Generator().manual_seed(0)
        for count in range(1, 41):
            rows = torch.randperm(96, generator=generator)[:count]
            assert torch.equal(head_on_rows(model.head, flat[rows]), full[rows]), count
