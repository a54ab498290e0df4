"""The tensors each vdiff model returns, as numpy arrays with the leading batch dimension of 1.

Every model of the repository has `max_batch_size: 1`: each request is one prompt, and the batch
dimension lets clients send `[[x]]`-shaped inputs as TensorRT-LLM's ensemble takes them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vdiff.backend.detokenize import text_delta
from vdiff.backend.service import Update
from vdiff.tokenizer import Tokenizer


def _int(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def _text(value: str) -> np.ndarray:
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def tokenizer_outputs(ids: list[int]) -> dict[str, np.ndarray]:
    return {"INPUT_IDS": np.array([ids], dtype=np.int32), "INPUT_LENGTH": _int(len(ids))}


def denoiser_outputs(update: Update) -> dict[str, np.ndarray]:
    return {
        "TOKENS": np.array([update.token_ids], dtype=np.int32),
        "TEXT_OFFSET": _int(update.text_offset),
        "TEXT_END": _int(update.text_end),
        "PROMPT_TEXT": _text(update.prompt_text),
        "NUM_INPUT_TOKENS": _int(update.prompt_tokens),
        "NUM_OUTPUT_TOKENS": _int(update.new_tokens),
        "STEP_INDEX": _int(update.step_index),
        "QUEUE_TIME": np.array([[update.queue_time]], dtype=np.float32),
        "FINISH_REASON": _text(update.finish_reason),
        "REQUEST_KEY": _text(update.key),
    }


def detokenizer_outputs(tokenizer: Tokenizer, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The public outputs of one denoiser response: its text delta and the counts passed through."""
    ids = inputs["TOKENS"].reshape(-1).tolist()
    delta = text_delta(tokenizer, ids, _scalar(inputs["TEXT_OFFSET"]), _scalar(inputs["TEXT_END"]))
    prompt = inputs["PROMPT_TEXT"].reshape(-1)[0].decode("utf-8")
    return {
        "TEXT_OUTPUT": _text(prompt + delta),
        "NUM_INPUT_TOKENS": inputs["NUM_INPUT_TOKENS"].reshape(1, 1).astype(np.int32),
        "NUM_OUTPUT_TOKENS": inputs["NUM_OUTPUT_TOKENS"].reshape(1, 1).astype(np.int32),
        "STEP_INDEX": inputs["STEP_INDEX"].reshape(1, 1).astype(np.int32),
        "QUEUE_TIME": inputs["QUEUE_TIME"].reshape(1, 1).astype(np.float32),
        "FINISH_REASON": inputs["FINISH_REASON"].reshape(1, 1),
    }


def request_key(inputs: Mapping[str, np.ndarray]) -> str:
    key: bytes = inputs["REQUEST_KEY"].reshape(-1)[0]
    return key.decode("utf-8")


def _scalar(array: np.ndarray) -> int:
    return int(array.reshape(-1)[0])
