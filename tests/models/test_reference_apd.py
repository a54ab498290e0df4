"""vdiff's APD engine against APD's published `apd_sample` (danielmisrael/apd dream/generation_utils.py,
as $VDIFF_REFERENCE_CODE/dream holds it), on the tiny Dream checkpoint with a tiny verifier."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from reference_code import DTYPES, REQUIRES_REFERENCE, engine, official_model, with_reference_code
from vdiff import SamplingParams

pytestmark = REQUIRES_REFERENCE

APD_PROMPTS = ([17, 42, 99, 7, 256, 31, 5], [3, 141, 59, 26, 53], [200, 100, 50, 25, 12, 6, 3, 1, 300])
APD_LENGTH = 24


@pytest.fixture(scope="module")
def apd_reference(tiny_dream: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Dream checkpoint with APD's dream/*.py and config use_cache=True, and its verifier."""
    root = tmp_path_factory.mktemp("apd-reference")
    checkpoint = with_reference_code(tiny_dream, "dream", root, name="tiny-dream-apd")
    config = json.loads((checkpoint / "config.json").read_text())
    config["use_cache"] = True
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint, wide_verifier(tiny_dream, int(config["vocab_size"]), root / "verifier")


def wide_verifier(model_dir: Path, width: int, out: Path) -> Path:
    """tests/conftest.py's write_verifier, but with logits as wide as the Dream model's (448 rows,
    past the tokenizer's 389 ids): APD's code cuts Dream's logits to a literal 151936 only after
    drafting, so a narrower verifier fails the mixture's add. The rows past the tokenizer are
    padding to both models; vdiff's vocabulary check compares the ids both define."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=width, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


MASK_COMMITTED, MASK_DRAFTED = "the mask id committed", "the mask id drafted at the first rejection"
MASK_CHOSEN, ROUNDING = "the mask id chosen by the mixture", "bf16 mixture rounding"
MASK_ID = (MASK_COMMITTED, MASK_DRAFTED, MASK_CHOSEN)


def vdiff_would_differ(
    draft: torch.Tensor,
    diffusion: torch.Tensor,
    verifier: torch.Tensor,
    accept: torch.Tensor,
    weight: float,
    mask_id: int,
) -> str | None:
    """Whether vdiff's rule decides one published APD round differently, and why (None: alike).

    The round's outcome rests on its deciding positions: the accepted drafts and the first rejected
    one. vdiff drafts with the mask id banned (float32 min) and forms the mixture in float32; the
    published code drafts over every id and forms the mixture in the model's dtype. The drafts
    agree unless the published one is the mask id; each verdict draft == choice agrees unless the
    published choice is the mask id or (bf16) the rounding of its bf16 mixture flips it."""
    n = diffusion.shape[1]
    draft, diffusion, verifier = draft[0, -n:], diffusion[0], verifier[0, -n:]
    accepted = min(int(accept.sum()), n)
    deciding = accepted + 1
    if (draft[:accepted] == mask_id).any():
        return MASK_COMMITTED
    if (draft[:deciding] == mask_id).any():
        return MASK_DRAFTED
    mixture = weight * diffusion + (1 - weight) * verifier  # as apd_accept_criterion forms it
    theirs = draft == mixture.argmax(-1)
    banned = diffusion.float().clone()
    banned[:, mask_id] = torch.finfo(torch.float32).min
    assert torch.equal(banned.argmax(-1)[:deciding], draft[:deciding])
    ours = draft == (weight * banned + (1 - weight) * verifier.float()).argmax(-1)
    flipped = (theirs != ours)[1:deciding]  # the first draft is accepted whatever the verdict
    if not flipped.any():
        return None
    return MASK_CHOSEN if (mixture[1:deciding].argmax(-1)[flipped] == mask_id).any() else ROUNDING


@dataclass
class ApdRun:
    tokens: list[int]  # the tokens committed in the rounds before `stop`
    stop: str | None  # why the comparison ends before the run does (None: it covers the whole run)


@contextmanager
def judged(module: ModuleType, mask_id: int, reasons: list[str | None]) -> Iterator[None]:
    """apd_accept_criterion unchanged, each round's vdiff_would_differ appended to `reasons`."""
    judge = module.apd_accept_criterion

    def spy(x: torch.Tensor, diffusion: torch.Tensor, verifier: torch.Tensor, noise: Any, weight: float) -> Any:
        accept = judge(x, diffusion, verifier, noise, weight)
        reasons.append(vdiff_would_differ(x, diffusion, verifier, accept, weight, mask_id))
        return accept

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "apd_accept_criterion", spy)
        yield


def published_apd(
    model: Any, verifier: Any, prompt: list[int], weight: float, window: int | None,
    lookahead: int | None,
) -> ApdRun:  # fmt: skip
    """APD's apd_sample through diffusion_generate at temperature 0 (no top-k/top-p filter), and the
    tokens it commits in its rounds before the first that vdiff_would_differ flags."""
    module = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".generation_utils"]
    mask_id = int(model.config.mask_token_id)
    reasons: list[str | None] = []
    counts: list[int] = []
    canvas: list[torch.Tensor] = []

    def after_round(cursor: int | None, x: torch.Tensor, accepted: list[int] | None) -> None:
        if accepted is not None:
            counts[:], canvas[:] = accepted, [x[0, len(prompt) :].clone()]

    with judged(module, mask_id, reasons), torch.no_grad():
        try:
            model.diffusion_generate(
                torch.tensor([prompt]), max_new_tokens=APD_LENGTH, alg="apd", temperature=0.0, top_p=None,
                top_k=None, apd_mixture_weight=weight, kv_window=window, max_lookahead=lookahead,
                verifier_model=verifier, generation_tokens_hook_func=after_round,
            )  # fmt: skip
        except RuntimeError:
            # a committed mask id is a mask again to the next round, whose window then has one more
            # mask than the lookahead has drafts: the published code's size mismatch
            assert MASK_COMMITTED in reasons, reasons
    cut = next((i for i, reason in enumerate(reasons) if reason), len(reasons))
    committed = sum(counts[:cut])
    tokens = canvas[0][:committed].tolist()
    assert mask_id not in tokens
    return ApdRun(tokens, reasons[cut] if cut < len(reasons) else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [0.3, 0.7])
def test_engine_equals_published_apd_sample(
    tiny_dream: Path, apd_reference: tuple[Path, Path], dtype: str, weight: float
) -> None:
    """vdiff's APD engine against APD's published apd_sample (the official Dream model with APD's
    generation_utils.py, through diffusion_generate), temperature 0, batch 1, both sides and both
    models in `dtype`: R = weight, W in {None, 2, 4}, M in {None, 3, 6}, three prompts, 24 tokens.

    The set-up the published code needs: the checkpoint's config says use_cache=True (APD's
    DreamConfig defaults to False, which leaves outputs.past_key_values None and W inert), and the
    verifier's logits are as wide as the Dream model's (`wide_verifier`). vdiff ignores EOS; the
    published loop stops after the round that commits one (no EOS is generated in these cases).

    What is compared: the tokens the published run commits in its rounds before the first one that
    vdiff's rule would decide differently (`vdiff_would_differ`), i.e. every token in a case
    where there is no such round:
    - the mask id. The published code drafts it, or its mixture chooses it (rejecting a draft
      vdiff accepts); vdiff bans it from both. A committed mask id is then a mask again to the
      next round, which crashes (size mismatch).
    - bf16 only: the published mixture R * d + (1 - R) * v is rounded in bf16 three times, vdiff's
      is formed in float32, and the rounding can flip a draft's verdict. In float32 the two
      mixtures are the same numbers, and the test asserts that no round is cut for this reason.
    With this tiny model and verifier, of the 54 cases per dtype, float32 compares 43 whole and
    cuts 11 at the mask id; bf16 compares 34 whole, cuts 8 at the mask id and 12 at rounding
    (run with -s for the counts). The check is on vdiff's own tokens, so a vdiff round that
    differed for any other reason (its KV windows, its verifier cache, its positions) fails it."""
    from transformers import AutoModelForCausalLM

    checkpoint, verifier_path = apd_reference
    model = official_model(checkpoint, dtype)
    verifier = AutoModelForCausalLM.from_pretrained(str(verifier_path), dtype=getattr(torch, dtype)).eval()
    llm = engine(tiny_dream, dtype, verifier=str(verifier_path))
    whole = compared = 0
    stops: dict[str, int] = {}
    for prompt, window, lookahead in itertools.product(APD_PROMPTS, (None, 2, 4), (None, 3, 6)):
        case = (prompt, weight, window, lookahead)
        expected = published_apd(model, verifier, prompt, weight, window, lookahead)
        params = SamplingParams(
            algorithm="apd", apd_mixture_weight=weight, apd_kv_window=window, apd_max_lookahead=lookahead,
            max_tokens=APD_LENGTH, temperature=0.0, full_canvas=True,
        )  # fmt: skip
        got = llm.generate([prompt], params)[0].token_ids
        assert got[: len(expected.tokens)] == expected.tokens, (case, expected.stop)
        assert expected.stop in (None, *MASK_ID) or (expected.stop == ROUNDING and dtype == "bfloat16"), case
        stops[str(expected.stop)] = stops.get(str(expected.stop), 0) + 1
        whole += len(expected.tokens) == APD_LENGTH
        compared += len(expected.tokens)
    print(f"{dtype} R={weight}: {whole}/27 cases compared whole, {compared}/{27 * APD_LENGTH} tokens; stops {stops}")
    assert whole >= 9  # a third of the cases at least: the cut-offs must not hollow the comparison out
