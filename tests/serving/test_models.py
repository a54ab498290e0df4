"""Each model.py in-process, with the stand-in `triton_python_backend_utils`: parsing and responses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pb_utils_standin as pb
from pb_utils_standin import load_model, scalar, text
from vdiff.backend.responder import Update
from vdiff.backend.tensors import PASSED_ON, denoiser_outputs
from vdiff.tokenizer import Tokenizer


def test_tokenizer_encodes_and_refuses_bad_requests(tiny_llada: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("tokenizer", tiny_llada, monkeypatch)
    good = pb.Request({"text_input": text("hello world"), "max_tokens": scalar(8, np.int32)})
    missing = pb.Request({"max_tokens": scalar(8, np.int32)})
    bad = pb.Request({"text_input": text("x"), "algorithm": text("fastest")})
    responses = model.execute([good, missing, bad])
    ids = Tokenizer.load(tiny_llada).encode("hello world")
    assert responses[0].outputs()["INPUT_IDS"].tolist() == [ids]
    assert responses[0].outputs()["INPUT_LENGTH"].tolist() == [[len(ids)]]
    assert responses[1].error().code() == pb.TritonError.INVALID_ARG
    assert responses[1].error().message().startswith("[vdiff:invalid_input] input 'text_input' is required")
    assert responses[2].error().code() == pb.TritonError.INVALID_ARG
    assert "algorithm must be one of" in responses[2].error().message()


def test_tokenizer_passes_token_ids_through_after_checking_them(
    tiny_llada: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model("tokenizer", tiny_llada, monkeypatch)
    vocab = Tokenizer.load(tiny_llada).vocab_size
    ids = np.array([[5, 6, 7]], dtype=np.int32)
    good = pb.Request({"input_ids": ids})
    both = pb.Request({"input_ids": ids, "text_input": text("x")})
    outside = pb.Request({"input_ids": np.array([[5, vocab]], dtype=np.int32)})
    echo = pb.Request({"input_ids": ids, "exclude_input_in_output": scalar(False, bool)})
    responses = model.execute([good, both, outside, echo])
    assert responses[0].outputs()["INPUT_IDS"].tolist() == [[5, 6, 7]]
    assert "not both" in responses[1].error().message()
    assert responses[2].error().message() == (
        "[vdiff:invalid_input] input 'input_ids'[1]: "
        f"token id {vocab} is out of vocabulary (ids run from 0 to {vocab - 1})"
    )
    assert "send the prompt as text" in responses[3].error().message()


def test_denoiser_streams_tensors_and_ends_with_final(tiny_llada: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("diffusion_denoise", tiny_llada, monkeypatch)
    ids = Tokenizer.load(tiny_llada).encode("hello")
    try:
        prompt = np.array([ids], dtype=np.int32)
        request = pb.Request({"input_ids": prompt, "max_tokens": scalar(16, np.int32), "stream": scalar(True, bool)})
        bad = pb.Request({"input_ids": prompt, "top_p": scalar(0.0, np.float32)})
        stop_without_id = pb.Request({"stop": scalar(True, bool)})
        assert model.execute([request, bad, stop_without_id]) is None
        assert request.sender.closed.wait(60)
        outputs = [response.outputs() for response, _ in request.sender.responses]
        assert [flags for _, flags in request.sender.responses][-1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        ids_sent = [i for o in outputs for i in o["output_ids"].reshape(-1).tolist()]
        assert sum(int(o["num_output_tokens"][0, 0]) for o in outputs) == len(ids_sent) == 16
        text_sent = "".join(o["text_output"][0, 0].decode() for o in outputs)
        assert text_sent == Tokenizer.load(tiny_llada).decode(ids_sent)
        assert outputs[-1]["finish_reason"].tolist() == [[b"length"]]
        assert all(o["num_input_tokens"].tolist() == [[len(ids)]] for o in outputs)
        for failed in (bad, stop_without_id):
            (response, flags), *rest = failed.sender.responses
            assert not rest and flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            assert response.error().code() == pb.TritonError.INVALID_ARG
        assert "top_p" in bad.sender.responses[0][0].error().message()
        assert "needs the id" in stop_without_id.sender.responses[0][0].error().message()
    finally:
        model.finalize()


def test_detokenizer_passes_the_delta_on_and_stops_cancelled_work(
    tiny_llada: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model("detokenizer", tiny_llada, monkeypatch)
    update = Update("vdiff-7", [11, 12], " two", 4, 9, 0.25, "")
    live = pb.Request(denoiser_outputs(update))
    cancelled = pb.Request(denoiser_outputs(update), cancelled=True)
    pb.InferenceRequest.executed.clear()
    first, second = model.execute([live, cancelled])
    assert first.outputs()["text_output"].tolist() == [[b" two"]]
    assert first.outputs()["step_index"].tolist() == [[9]] and first.outputs()["num_output_tokens"].tolist() == [[2]]
    assert first.outputs()["queue_time"].tolist() == [[0.25]]
    assert set(first.outputs()) == PASSED_ON  # what the ensemble maps to its outputs
    assert not second.has_error()  # an error here would leave Triton 2.51's ensemble waiting forever
    (order,) = pb.InferenceRequest.executed
    assert order.model_name == "diffusion_denoise" and order.request_id == "vdiff-7"
    assert [t.name() for t in order.inputs] == ["stop"]
