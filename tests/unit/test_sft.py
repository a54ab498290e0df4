"""LLaDA's SFT batches and loss, and the verifier's next-token loss, on a real (tiny) model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdiff.training.sft import MASK_FLOOR, causal_lm_loss, llada_sft_loss, sft_batch, stratified_times

EOS, MASK = 9, 7


def test_batch_pads_each_answer_with_eos_to_the_answer_length_and_marks_regions() -> None:
    batch = sft_batch([[1, 2, 3], [4]], [[5], [6, 6]], answer_len=4, eos=EOS)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, EOS, EOS, EOS], [4, 6, 6, EOS, EOS, EOS, EOS]]
    assert batch.answer.int().tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]]
    assert batch.keep.int().tolist() == [[1] * 7, [1] * 5 + [0] * 2]


def test_batch_refuses_an_answer_longer_than_the_answer_length() -> None:
    with pytest.raises(ValueError, match="answer of 3 tokens does not fit the answer length 2"):
        sft_batch([[1]], [[2, 3, 4]], answer_len=2, eos=EOS)


def test_stratified_times_cover_every_stratum_once() -> None:
    t = stratified_times(8, torch.Generator().manual_seed(0))
    assert sorted((t * 8).floor().int().tolist()) == list(range(8))


class Recorder(nn.Module):
    """A real (linear) model that records what it was fed; logits favour token 0 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 16)
        self.seen: list[Tensor] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> object:
        self.seen.append(input_ids.clone())
        return type("Out", (), {"logits": self.embed(input_ids)})()


def test_sft_loss_masks_only_answer_tokens_and_weights_them_by_one_over_p_mask() -> None:
    model = Recorder()
    batch = sft_batch([[1, 2, 3]] * 64, [[4, 5]] * 64, answer_len=4, eos=EOS)
    loss = llada_sft_loss(model, batch, MASK, torch.Generator().manual_seed(1))
    noisy = model.seen[0]
    assert (noisy[:, :3] == torch.tensor([1, 2, 3])).all()  # the prompt is never masked
    masked = noisy == MASK
    assert masked[:, 3:].any() and not masked[:, :3].any()
    assert loss.requires_grad and torch.isfinite(loss)
    loss.backward()


def test_sft_loss_is_an_unbiased_estimate_of_the_mean_token_loss() -> None:
    # with a model whose per-token loss is the same everywhere, E[loss] = that token loss
    model = Recorder()
    nn.init.zeros_(model.embed.weight)  # uniform logits: CE = log(16) at every position
    batch = sft_batch([[1, 2]] * 256, [[4, 5, 6]] * 256, answer_len=8, eos=EOS)
    losses = [llada_sft_loss(model, batch, MASK, torch.Generator().manual_seed(s)).item() for s in range(40)]
    assert sum(losses) / len(losses) == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=0.1)
    assert MASK_FLOOR == 1e-3


def test_causal_loss_covers_the_answer_through_its_first_eos_only() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    model = LlamaForCausalLM(config)
    batch = sft_batch([[1, 2]], [[4]], answer_len=3, eos=EOS)  # [1, 2, 4, EOS, EOS]
    loss = causal_lm_loss(model, batch, EOS)
    logits = model(batch.input_ids).logits[0]  # (L, V); position i predicts token i + 1
    # the targets are the answer token 4 (predicted at position 1) and the first EOS (at 2), not the pad EOS
    expected = F.cross_entropy(logits[1:3], torch.tensor([4, EOS]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
