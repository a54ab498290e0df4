"""vdiff's native models and engine against the official modeling and sampling code, on the same tiny checkpoints.

The official files cannot ship with vdiff, so this runs when VDIFF_REFERENCE_CODE points to a
directory holding them as published with the models:
    $VDIFF_REFERENCE_CODE/llada/{modeling_llada.py, configuration_llada.py[, generate.py]}
    $VDIFF_REFERENCE_CODE/dream/{modeling_dream.py, configuration_dream.py, generation_utils.py}
The Dream files are APD's copies (danielmisrael/apd): its generation_utils.py has HF Dream's
`_sample` of April 2025 plus `apd_sample`. The test copies them into a tiny checkpoint (whose
config.json already carries the real auto_map) and loads it with transformers' trust_remote_code.

Optionally VDIFF_REFERENCE_CODE_PER_ROW points to a directory of the same layout whose
dream/generation_utils.py has the later per-row `_sample` (e.g. ZHZisZZ/dllm@7b834e4e
dllm_trainer/pipelines/dream/models/generation_utils.py, beside APD's modeling/configuration files).

Dtype is an explicit axis: every comparison names float32 or bfloat16 for both sides, vdiff's
model or engine (on the CPU, where the official model runs) and the official model alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from reference_code import DTYPES, PER_ROW, REFERENCE, REQUIRES_REFERENCE, engine, official_model, with_reference_code
from vdiff import SamplingParams
from vdiff.models import load_model

pytestmark = REQUIRES_REFERENCE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logits_equal_official_code_bit_for_bit(
    family: str, dtype: str, tiny_llada: Path, tiny_dream: Path, tmp_path: Path
) -> None:
    """Same op order and dtypes as the originals (RMSNorm cast, RoPE precision), so equal bits."""
    path = with_reference_code(tiny_llada if family == "llada" else tiny_dream, family, tmp_path)
    ours, theirs = load_model(path, dtype=dtype, device="cpu"), official_model(path, dtype)
    ids = torch.randint(0, 380, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llada_padded_batch_equals_official_code(tiny_llada: Path, tmp_path: Path, dtype: str) -> None:
    """The Oct-2025 LLaDA code masks padding on the key side; so does vdiff. The tolerance is float32's
    (in bf16 it admits no rounding step of values above ~1e-3); the logits are in fact equal bits in both."""
    path = with_reference_code(tiny_llada, "llada", tmp_path)
    ours, theirs = load_model(path, dtype=dtype, device="cpu"), official_model(path, dtype)
    ids = torch.randint(0, 380, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dream_padded_batch_equals_official_code(tiny_dream: Path, tmp_path: Path, dtype: str) -> None:
    """Dream's sampler passes a 4D both-sides mask and cumsum positions; compare on real rows, with
    float32's tolerance in both dtypes (the real rows are in fact equal bits in both)."""
    path = with_reference_code(tiny_dream, "dream", tmp_path)
    ours, theirs = load_model(path, dtype=dtype, device="cpu"), official_model(path, dtype)
    ids = torch.randint(0, 380, (2, 16), generator=torch.Generator().manual_seed(2))
    keep = torch.ones_like(ids)
    keep[0, :5] = 0
    positions = (keep.cumsum(-1) - 1).masked_fill(keep == 0, 1)
    dense = (keep[:, None, None, :] & keep[:, None, :, None]).bool()
    with torch.no_grad():
        expected = theirs(ids, dense, positions).logits
        got = ours(ids, dense, positions).logits
    torch.testing.assert_close(got[0, 5:], expected[0, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_official_llada_sampler_drives_vdiff_like_its_own_model(tiny_llada: Path, tmp_path: Path, dtype: str) -> None:
    """LLaDA's published generate() (generate.py beside the modeling files) over a padded batch:
    the same canvases with vdiff's model as with the official one (greedy, CFG, random remasking,
    T > 0), both in `dtype`. Exact in bf16 too: the padded logits are equal bits, and the sampler
    is the same code on both sides."""
    reference = _load_llada_generate()
    path = with_reference_code(tiny_llada, "llada", tmp_path)
    ours, theirs = load_model(path, dtype=dtype, device="cpu"), official_model(path, dtype)
    mask_id = ours.mask_token_id
    ids = torch.randint(0, 380, (2, 12), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids)
    attention[0, :4] = 0
    settings: list[dict[str, Any]] = [
        {"steps": 32, "gen_length": 32, "block_length": 8},
        {"steps": 16, "gen_length": 32, "block_length": 16, "cfg_scale": 1.0},
        {"steps": 32, "gen_length": 32, "block_length": 8, "remasking": "random"},
        {"steps": 32, "gen_length": 32, "block_length": 8, "temperature": 0.7},
    ]
    for setting in settings:
        torch.manual_seed(0)
        got = reference.generate(ours, ids, attention_mask=attention, mask_id=mask_id, **setting)
        torch.manual_seed(0)
        expected = reference.generate(theirs, ids, attention_mask=attention, mask_id=mask_id, **setting)
        assert torch.equal(got, expected), setting
        assert not (got == mask_id).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_equals_published_llada_generate(tiny_llada: Path, tmp_path: Path, dtype: str) -> None:
    """vdiff's engine against LLaDA's own generate(), temperature 0, batch 1, on vdiff's model and on
    the official one, all in `dtype`. Exact in bf16 too: generate() calls topk on a canvas-length
    row holding -inf off the candidates, and vdiff builds the same row, so ties in bf16
    confidences resolve alike."""
    reference = _load_llada_generate()
    llm = engine(tiny_llada, dtype)
    theirs = official_model(with_reference_code(tiny_llada, "llada", tmp_path), dtype)
    prompt = [17, 42, 99, 7, 256, 31, 5]
    for setting in (
        {"steps": 32, "gen_length": 32, "block_length": 8},
        {"steps": 12, "gen_length": 24, "block_length": 8},
    ):
        params = SamplingParams(
            max_tokens=setting["gen_length"],
            steps=setting["steps"],
            block_length=setting["block_length"],
            full_canvas=True,
        )
        got = llm.generate([prompt], params)[0].token_ids
        for model in (llm.model, theirs):
            expected = reference.generate(model, torch.tensor([prompt]), mask_id=llm.tokenizer.special.mask, **setting)
            assert got == expected[0, len(prompt) :].tolist(), (setting, type(model).__module__)


# --- Dream's diffusion_generate -------------------------------------------------------------------


@dataclass
class Pick:
    """One torch.topk call of Dream's `_sample`: the (n,) confidence at the canvas's n masks (their
    positions, in order), k, and the positions chosen."""

    confidence: torch.Tensor
    masks: torch.Tensor
    k: int
    chosen: set[int]


@dataclass
class DreamRun:
    tokens: list[int]
    picks: list[Pick] = field(default_factory=list)


def dream_sample(model: Any, prompt: list[int], algorithm: str, top_k: int | None, per_row: bool = False) -> DreamRun:
    """The official model's diffusion_generate (max_new_tokens 24, steps 12, T = 0, seed 5), recording
    every top-k choice of masks to commit.

    `_sample` in APD's copy (HF Dream, April 2025) calls torch.topk(confidence, k) on the compact
    (n_masks,) confidence vector. With per_row, that call alone is answered as the later per-row
    `_sample` makes it (NVlabs/Fast-dLLM@24cc59e, ZHZisZZ/dllm@7b834e4e): topk on a
    (1, canvas_len) row holding the confidence at the masks and -inf elsewhere, its indices mapped
    back into the compact vector. Nothing else changes; the vocabulary topk of the top-k filter
    (2-D) is passed through."""
    mask_id = int(model.config.mask_token_id)
    canvas: list[torch.Tensor] = []
    run = DreamRun([])
    real_topk = torch.topk

    def see_canvas(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        canvas[:] = [x[0].clone()]  # the canvas whose masks this step's confidence covers
        return logits

    def topk(values: torch.Tensor, k: Any, *args: Any, **kwargs: Any) -> Any:
        if values.dim() != 1:
            return real_topk(values, k, *args, **kwargs)
        masks = (canvas[0] == mask_id).nonzero()[:, 0]
        if per_row:
            row = values.new_full((1, canvas[0].numel()), float("-inf"))
            row[0, masks] = values
            top, chosen = real_topk(row, int(k))
            top, index = top[0], torch.searchsorted(masks, chosen[0])
        else:
            top, index = real_topk(values, k, *args, **kwargs)
        run.picks.append(Pick(values.clone(), masks, int(k), set(masks[index].tolist())))
        return torch.return_types.topk((top, index))

    options = {"top_k": None} if top_k is None else {}  # the default call is the top-50 one
    torch.manual_seed(5)  # origin reveals positions at random even at temperature 0; the engine seeds alike
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(torch, "topk", topk)
        out = model.diffusion_generate(
            torch.tensor([prompt]), max_new_tokens=24, steps=12, alg=algorithm, temperature=0.0,
            generation_logits_hook_func=see_canvas, **options,
        )  # fmt: skip
    run.tokens = out[0, len(prompt) :].tolist()
    return run


def assert_differ_by_a_tie(compact: DreamRun, per_row: DreamRun) -> None:
    """Two runs of `_sample` that differ only in topk's layout and whose outputs differ: up to the first
    step where they commit different masks they are the same run, so that step's canvas, logits and
    confidence are the same; the two choices are then both valid top-k sets: every mask committed
    by one run and not the other holds exactly the k-th largest confidence."""
    pairs = zip(compact.picks, per_row.picks, strict=False)
    step = next((i for i, (a, b) in enumerate(pairs) if a.chosen != b.chosen), None)
    assert step is not None, "the runs differ, but not in a choice of masks"
    a, b = compact.picks[step], per_row.picks[step]
    assert torch.equal(a.confidence, b.confidence) and torch.equal(a.masks, b.masks) and a.k == b.k
    kth = torch.sort(a.confidence, descending=True).values[a.k - 1]
    differing = torch.tensor(sorted(a.chosen ^ b.chosen))
    at = torch.searchsorted(a.masks, differing)
    assert torch.equal(a.masks[at], differing)
    assert torch.all(a.confidence[at] == kth), (step, sorted(a.chosen), sorted(b.chosen), a.confidence[at], kth)


DREAM_PROMPT = [17, 42, 99, 7, 256, 31, 5]


def dream_params(algorithm: str, top_k: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=24, steps=12, algorithm=algorithm, seed=5, full_canvas=True, top_k=top_k or 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("top_k", [None, 50])
def test_engine_equals_published_dream_diffusion_generate(
    tiny_dream: Path, tmp_path: Path, algorithm: str, top_k: int | None, dtype: str
) -> None:
    """vdiff's engine against the official Dream model's own diffusion_generate(), temperature 0,
    batch 1, both in `dtype`.

    Called without top_k, diffusion_generate under transformers 4.5x filters to the top 50 tokens:
    the model's generation_config says null, but transformers' GenerationConfig default (50) wins
    the merge. Only an explicit top_k=None turns the filter off.

    float32: token for token equal.

    bfloat16: the logits are still equal bits, but bf16 confidences tie often (a softmax
    probability or a negative entropy has 8 significant bits), and torch.topk's order among equal
    values depends on the tensor it is given. APD's copy of `_sample` (HF Dream of April 2025)
    calls topk on the compact (n_masks,) confidence; vdiff follows the later per-row `_sample`
    (NVlabs/Fast-dLLM@24cc59e, ZHZisZZ/dllm@7b834e4e), which calls it on a canvas-length row
    holding -inf off the masks, and where the k-th largest confidence is shared by masks on both
    sides of the cut the two layouts commit different ones (e.g. maskgit_plus without top_k, step
    6: 13 masks, k = 2, canvas positions 13 and 14 both at 0.029296875; compact commits 14,
    per-row 13; entropy at step 0 already, 17 of 24 masks at -5.625, k = 1).
    So in bf16 vdiff equals the published `_sample` with that one topk answered per-row
    (`dream_sample(per_row=True)`), and where the published run itself differs, it differs from
    that run by a tie: at their first differing step both commit a valid top-k set of the same
    confidence (`assert_differ_by_a_tie`); after it the canvases differ, so nothing more holds.
    """
    theirs = official_model(with_reference_code(tiny_dream, "dream", tmp_path), dtype)
    got = engine(tiny_dream, dtype).generate([DREAM_PROMPT], dream_params(algorithm, top_k))[0].token_ids
    published = dream_sample(theirs, DREAM_PROMPT, algorithm, top_k)
    if dtype == "float32":
        assert got == published.tokens
        return
    per_row = dream_sample(theirs, DREAM_PROMPT, algorithm, top_k, per_row=True)
    assert got == per_row.tokens
    if published.tokens != per_row.tokens:
        assert_differ_by_a_tie(published, per_row)


@pytest.mark.skipif(not PER_ROW, reason="set VDIFF_REFERENCE_CODE_PER_ROW to a per-row Dream generation_utils.py")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("top_k", [None, 50])
def test_engine_equals_per_row_dream_diffusion_generate(
    tiny_dream: Path, tmp_path: Path, algorithm: str, top_k: int | None, dtype: str
) -> None:
    """vdiff's engine against a published per-row `_sample` ($VDIFF_REFERENCE_CODE_PER_ROW/dream),
    unmodified, in both dtypes: token for token equal, bf16 ties included. It also checks the
    per-row emulation the bf16 case above relies on: the same tokens."""
    path = with_reference_code(tiny_dream, "dream", tmp_path, source=PER_ROW, name="tiny-dream-per-row")
    per_row = official_model(path, dtype)
    expected = dream_sample(per_row, DREAM_PROMPT, algorithm, top_k).tokens
    assert engine(tiny_dream, dtype).generate([DREAM_PROMPT], dream_params(algorithm, top_k))[0].token_ids == expected
    published = official_model(with_reference_code(tiny_dream, "dream", tmp_path), dtype)
    assert dream_sample(published, DREAM_PROMPT, algorithm, top_k, per_row=True).tokens == expected


def _load_llada_generate() -> Any:
    import importlib.util

    source = Path(str(REFERENCE)) / "llada" / "generate.py"
    if not source.exists():
        pytest.skip(f"{source} is not there")
    spec = importlib.util.spec_from_file_location("llada_reference_generate", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
