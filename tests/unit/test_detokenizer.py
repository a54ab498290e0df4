"""Incremental detokenization: the same text as one whole decode, for work that grows with the news.
And the fast paths beside it (the Rust tokenizer called directly) give transformers' results."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vdiff import LLM, SamplingParams
from vdiff.detokenizer import IncrementalDetokenizer
from vdiff.tokenizer import SpecialTokens, Tokenizer
from vdiff_client.tokenizer import ProxyTokenizer

TEXT = "Hello world, naïve café — 日本語 ✓ 12 + 30 = 42.  Two  spaces, then ünïcödé and emoji 🙂 done."


def sentencepiece_like(clean_up: bool = False) -> Tokenizer:
    """A Metaspace BPE (leading-space pieces, as LLaMA-2's), trained here on a few lines."""
    rust = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>", *byte_pieces])
    rust.train_from_iterator([TEXT, TEXT.lower(), "the quick brown fox jumps over the lazy dog"] * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="</s>", clean_up_tokenization_spaces=clean_up)
    return Tokenizer(hf, SpecialTokens(mask=0, eos=hf.eos_token_id, pad=hf.eos_token_id))


@pytest.fixture(params=["tiny-bpe", "demo-chars", "metaspace", "cleans-up-spaces"])
def tokenizer(request: pytest.FixtureRequest, tiny_llada: Path) -> Tokenizer:
    if request.param == "tiny-bpe":
        return Tokenizer.load(tiny_llada)
    if request.param == "demo-chars":
        return Tokenizer.load("vdiff-demo")
    return sentencepiece_like(clean_up=request.param == "cleans-up-spaces")


def read_in_chunks(tokenizer: Tokenizer, ids: Sequence[int], seed: int) -> list[str]:
    """The texts reported after each chunk of ids, as the engine reads a growing stable prefix."""
    rng, decoder, end, texts = random.Random(seed), IncrementalDetokenizer(), 0, []
    while end < len(ids):
        end = min(len(ids), end + rng.randint(1, 5))
        decoder.extend(tokenizer, ids[:end], final=end == len(ids))
        texts.append(decoder.shown)
    return texts


@pytest.mark.parametrize("seed", range(4))
def test_incremental_text_equals_the_whole_decode_and_only_grows(tokenizer: Tokenizer, seed: int) -> None:
    ids = tokenizer.encode(TEXT if seed % 2 == 0 else TEXT.lower())
    rng = random.Random(seed)
    ids = ids + [rng.randrange(tokenizer.vocab_size) for _ in range(40)]  # arbitrary ids, specials too
    ids.insert(len(ids) // 3, tokenizer.special.eos)  # a special token mid-answer is skipped
    texts = read_in_chunks(tokenizer, ids, seed)
    assert texts[-1] == tokenizer.decode(ids) == tokenizer.hf.decode(ids, skip_special_tokens=True)
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))


def test_text_work_per_step_does_not_grow_with_the_answer(tiny_llada: Path) -> None:
    """512 tokens read one at a time: ids decoded per step stay flat (a whole decode: 131,000 in all)."""
    tokenizer = Tokenizer.load(tiny_llada)
    ids = (tokenizer.encode(TEXT) * 40)[:512]
    decoded: list[int] = []
    real_decode = tokenizer.decode
    tokenizer.decode = lambda part, **kw: decoded.append(len(part)) or real_decode(part, **kw)  # type: ignore[method-assign]
    decoder, per_step = IncrementalDetokenizer(), []
    for end in range(1, len(ids) + 1):
        decoded.clear()
        decoder.extend(tokenizer, ids[:end], final=end == len(ids))
        per_step.append(sum(decoded))
    assert decoder.text == real_decode(ids)
    assert max(per_step[256:]) <= max(per_step[:64]) <= 16


def test_streamed_text_with_stop_strings_only_grows_and_is_cut_before_the_stop(served_llm: LLM) -> None:
    """With stop strings, the characters a stop string could begin in wait; nothing sent is taken back."""
    engine = served_llm.engine
    prompt = engine.tokenizer.encode("Hello there")
    params = SamplingParams(max_tokens=48, steps=48, block_length=8, seed=3, temperature=0.0, full_canvas=True)
    whole = served_llm.generate([prompt], params)[0]
    clean = [i for i in range(4, len(whole.text) - 3) if "\ufffd" not in whole.text[i : i + 3]]
    stop = whole.text[clean[len(clean) // 2] : clean[len(clean) // 2] + 3]
    engine.add_request(prompt, params.replace(stop=[stop, "x" * 9]), request_id="stops")
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == "stops"]
    final = outputs[-1]
    assert final.finish_reason == "stop" and final.text == whole.text[: whole.text.index(stop)]
    assert "".join(o.new_text for o in outputs) == final.text
    assert all(final.text.startswith(o.text) for o in outputs)


def test_the_proxy_encodes_as_transformers_does(tokenizer: Tokenizer) -> None:
    """Its fast path (the Rust tokenizer itself) gives hf.encode's ids, special tokens and all."""
    proxy = ProxyTokenizer(tokenizer.hf, max_model_len=4096)
    special = tokenizer.hf.decode([tokenizer.special.eos])
    for text in (TEXT, f"  {special}x{special}\n\n\tend ", "", "a" * 3000):
        for add_special_tokens in (False, True):
            expected = tokenizer.hf.encode(text, add_special_tokens=add_special_tokens)
            assert proxy.encode(text, add_special_tokens) == expected
