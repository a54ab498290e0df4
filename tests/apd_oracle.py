"""A batch-1 loop of APD's `apd_sample` (danielmisrael/apd dream/generation_utils.py) at temperature 0,
written from the published code as the ground truth for vdiff's batched APD.

Two departures from the code, both shared with vdiff and both documented there: drafts are never
the mask id nor past the verifier's vocabulary (the code can commit the mask id, then counts it as
a mask in the next window and crashes on the size mismatch), and when a round accepts every draft
the verifier logits carried to the next round are those for the next position (the code carries
the row before it, which only ever scores a first draft, always accepted). A cached window is fed
from `left`, as in the code: for a shifted family the row scoring the cursor, cursor - 1, is
always inside it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CroppedCache:
    """APD's use of a DynamicCache for the diffusion model: crop to `left`, then append the window."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.left = 0

    def layer(self, index: int) -> _CroppedLayer:
        return _CroppedLayer(self, index)


class _CroppedLayer:
    def __init__(self, cache: CroppedCache, index: int) -> None:
        self.cache, self.index = cache, index

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, None]:  # (1, K, Q, D) each
        cache, i = self.cache, self.index
        if i == len(cache.keys):
            cache.keys.append(k)
            cache.values.append(v)
        else:
            cache.keys[i] = torch.cat([cache.keys[i][:, :, : cache.left], k], dim=2)
            cache.values[i] = torch.cat([cache.values[i][:, :, : cache.left], v], dim=2)
        return cache.keys[i], cache.values[i], None


@torch.no_grad()
def apd_reference(
    model: nn.Module,
    verifier: nn.Module,
    prompt: list[int],
    *,
    gen_length: int,
    mask_id: int,
    stop_ids: set[int],
    mixture_weight: float,
    kv_window: int | None = None,
    max_lookahead: int | None = None,
) -> tuple[list[int], int]:
    """The generated ids (up to and including the first stop id) and the rounds it took."""
    from transformers import DynamicCache

    shift = model.logits_shift
    x = torch.tensor(prompt + [mask_id] * gen_length)
    length, curr = len(x), len(prompt)
    cache: CroppedCache | None = None
    verifier_cache, carried = DynamicCache(), None
    accepted = rounds = 0
    while curr < length:
        right = length if max_lookahead is None else min(curr + max_lookahead, length)
        left = 0 if kv_window is None or cache is None else max(curr - kv_window - accepted + 1, 0)
        if kv_window is None:
            out = model(x[None, :right]).logits[0]
        else:
            cache = cache or CroppedCache()
            cache.left = left
            out = model(x[None, left:right], position_ids=torch.arange(left, right)[None], kv=cache).logits[0]
        rounds += 1
        # (n, V): positions curr .. right - 1; a shifted family's row for curr is curr - 1 >= left
        mask_logits = out[curr - shift - left : right - shift - left].float()
        mask_logits[:, mask_id] = torch.finfo(torch.float32).min
        mask_logits[:, verifier.get_output_embeddings().weight.shape[0] :] = torch.finfo(torch.float32).min
        x0 = mask_logits.argmax(-1)

        if carried is None:  # prefill: the prompt, then the drafts
            draft = x[:right].clone()
            draft[curr:right] = x0
            scores = verifier(draft[None], past_key_values=verifier_cache, use_cache=True).logits[0]
            verifier_logits, last = scores[curr - 1 : -1], scores[-1]
        else:
            scores = verifier(x0[None], past_key_values=verifier_cache, use_cache=True).logits[0]
            verifier_logits, last = torch.cat([carried[None], scores[:-1]]), scores[-1]
        width = min(mask_logits.shape[-1], verifier_logits.shape[-1])
        target = mixture_weight * mask_logits[:, :width] + (1 - mixture_weight) * verifier_logits[:, :width].float()
        accept = x0 == target.argmax(-1)
        accept[0] = True
        accepted = int(torch.cumprod(accept.long(), 0).sum())
        carried = verifier_logits[accepted] if accepted < len(x0) else last
        verifier_cache.crop(curr + accepted)

        x[curr : curr + accepted] = x0[:accepted]
        curr += accepted
        if any(int(t) in stop_ids for t in x[len(prompt) : curr]):
            break
    answer = x[len(prompt) : curr].tolist()
    ends = [i for i, t in enumerate(answer) if t in stop_ids]
    return (answer[: ends[0] + 1] if ends else answer), rounds
