"""The tensors each vdiff model returns, as numpy arrays with the leading batch dimension of 1.

Every model of the repository has `max_batch_size: 1`: each request is one prompt, and the batch
dimension lets clients send `[[x]]`-shaped inputs as TensorRT-LLM's ensemble takes them.
"""

from __future__ import annotations

import json

import numpy as np

from vdiff.backend.responder import Update


def _int(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def _text(value: str) -> np.ndarray:
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def tokenizer_outputs(ids: list[int]) -> dict[str, np.ndarray]:
    return {"INPUT_IDS": np.array([ids], dtype=np.int32), "INPUT_LENGTH": _int(len(ids))}


def denoiser_outputs(update: Update) -> dict[str, np.ndarray]:
    """The ensemble's outputs (text_output a delta), plus the ids of the delta and the request's key."""
    return {
        "text_output": _text(update.text),
        "output_ids": np.array([update.token_ids], dtype=np.int32),
        "num_input_tokens": _int(update.prompt_tokens),
        "num_output_tokens": _int(len(update.token_ids)),
        "step_index": _int(update.step_index),
        "queue_time": np.array([[update.queue_time]], dtype=np.float32),
        "finish_reason": _text(update.finish_reason),
        "stop_reason": _text(update.stop_reason),
        # with stream_canvas: a JSON list of the steps' events since the last response; else ""
        "canvas_events": _text(json.dumps([e.to_json() for e in update.canvas]) if update.canvas else ""),
        "request_key": _text(update.key),
    }


# what the detokenizer passes on: the denoiser decodes its text incrementally as it settles
PASSED_ON = frozenset(
    ("text_output", "num_input_tokens", "num_output_tokens", "step_index", "queue_time", "finish_reason",
     "stop_reason", "canvas_events")
)  # fmt: skip


def request_key(key: np.ndarray) -> str:
    """The request's key, from its `request_key` tensor."""
    value: bytes = key.reshape(-1)[0]
    return value.decode("utf-8")
