"""vdiff's native models against the official modeling code, on the same tiny checkpoint.

The official files cannot ship with vdiff, so this runs when VDIFF_REFERENCE_CODE points to a
directory holding them as published with the models:
    $VDIFF_REFERENCE_CODE/llada/{modeling_llada.py, configuration_llada.py[, generate.py]}
    $VDIFF_REFERENCE_CODE/dream/{modeling_dream.py, configuration_dream.py, generation_utils.py}
The test copies them into a tiny checkpoint (whose config.json already carries the real
auto_map), loads it with transformers' trust_remote_code, and compares logits in float32.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from vdiff.models import load_model

REFERENCE = os.environ.get("VDIFF_REFERENCE_CODE")
pytestmark = [
    pytest.mark.reference,
    pytest.mark.skipif(not REFERENCE, reason="set VDIFF_REFERENCE_CODE to the official modeling files"),
]


def with_reference_code(model_dir: Path, family: str, tmp_path: Path) -> Path:
    target = tmp_path / model_dir.name
    shutil.copytree(model_dir, target)
    for file in (Path(str(REFERENCE)) / family).glob("*.py"):
        shutil.copy(file, target / file.name)
    return target


def official_model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), trust_remote_code=True, torch_dtype=dtype)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logits_equal_official_code_bit_for_bit(
    family: str, dtype: torch.dtype, tiny_llada: Path, tiny_dream: Path, tmp_path: Path
) -> None:
    """Same op order and dtypes as the originals (RMSNorm cast, RoPE precision), so equal bits."""
    path = with_reference_code(tiny_llada if family == "llada" else tiny_dream, family, tmp_path)
    ours, theirs = load_model(path, dtype=dtype), official_model(path, dtype)
    ids = torch.randint(0, 380, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=0, rtol=0)


def test_llada_padded_batch_equals_official_code(tiny_llada: Path, tmp_path: Path) -> None:
    """The Oct-2025 LLaDA code masks padding on the key side; so does vdiff."""
    path = with_reference_code(tiny_llada, "llada", tmp_path)
    ours, theirs = load_model(path, dtype="float32"), official_model(path)
    ids = torch.randint(0, 380, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


def test_dream_padded_batch_equals_official_code(tiny_dream: Path, tmp_path: Path) -> None:
    """Dream's sampler passes a 4D both-sides mask and cumsum positions; compare on real rows."""
    path = with_reference_code(tiny_dream, "dream", tmp_path)
    ours, theirs = load_model(path, dtype="float32"), official_model(path)
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


def test_official_llada_sampler_drives_vdiff_like_its_own_model(tiny_llada: Path, tmp_path: Path) -> None:
    """LLaDA's published generate() (generate.py beside the modeling files) over a padded batch:
    the same canvases with vdiff's model as with the official one (greedy, CFG, random remasking, T > 0)."""
    reference = _load_llada_generate()
    path = with_reference_code(tiny_llada, "llada", tmp_path)
    ours, theirs = load_model(path, dtype="float32"), official_model(path)
    mask_id = ours.mask_token_id
    ids = torch.randint(0, 380, (2, 12), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids)
    attention[0, :4] = 0
    settings = [
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


def test_engine_equals_published_llada_generate(tiny_llada: Path) -> None:
    """vdiff's engine against LLaDA's own generate() on vdiff's model, temperature 0, batch 1."""
    from vdiff import LLM, SamplingParams

    reference = _load_llada_generate()
    llm = LLM(model=tiny_llada)
    prompt = [17, 42, 99, 7, 256, 31, 5]
    for setting in (
        {"steps": 32, "gen_length": 32, "block_length": 8},
        {"steps": 12, "gen_length": 24, "block_length": 8},
    ):
        expected = reference.generate(llm.model, torch.tensor([prompt]), mask_id=llm.tokenizer.special.mask, **setting)
        params = SamplingParams(
            max_tokens=setting["gen_length"],
            steps=setting["steps"],
            block_length=setting["block_length"],
            ignore_eos=True,
        )
        assert llm.generate([prompt], params)[0].token_ids == expected[0, len(prompt) :].tolist(), setting


@pytest.mark.parametrize("algorithm", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("top_k", [None, 50])
def test_engine_equals_published_dream_diffusion_generate(
    tiny_dream: Path, tmp_path: Path, algorithm: str, top_k: int | None
) -> None:
    """vdiff's engine against the official Dream model's own diffusion_generate(), temperature 0, batch 1.

    Called without top_k, diffusion_generate under transformers 4.5x filters to the top 50 tokens:
    the model's generation_config says null, but transformers' GenerationConfig default (50) wins
    the merge. Only an explicit top_k=None turns the filter off.
    """
    from vdiff import LLM, SamplingParams

    theirs = official_model(with_reference_code(tiny_dream, "dream", tmp_path))
    llm = LLM(model=tiny_dream)
    prompt = [17, 42, 99, 7, 256, 31, 5]
    torch.manual_seed(5)  # origin reveals positions at random even at temperature 0; the engine seeds alike
    options = {"top_k": None} if top_k is None else {}  # the default call is the top-50 one
    expected = theirs.diffusion_generate(
        torch.tensor([prompt]), max_new_tokens=24, steps=12, alg=algorithm, temperature=0.0, **options
    )
    params = SamplingParams(max_tokens=24, steps=12, algorithm=algorithm, seed=5, ignore_eos=True, top_k=top_k or 0)
    assert llm.generate([prompt], params)[0].token_ids == expected[0, len(prompt) :].tolist()


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
