"""The `vdiff` command as a user runs it: vLLM's flags, health while loading, the README example, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import openai
import pytest

from clients import processes_mentioning
from command_harness import start_vdiff, wait_healthy
from vdiff import LLM
from vdiff.serve.cli import openai_parser
from vdiff_client.args import IGNORED_FLAGS, ignored_flags_given
from vdiff_client.tokenizer import parse_max_model_len

# a held-out-style question the shipped demo model answers correctly
QUESTION, ANSWER = "Sort: 14 7 26 50", "7 14 26 50"


def test_vllm_serve_flags_parse() -> None:
    args = openai_parser().parse_args(
        [
            "/models/x",
            "--served-model-name",
            "a",
            "b",
            "--max-model-len",
            "4K",
            "--api-key",
            "k1",
            "k2",
            "--allowed-origins",
            '["https://a.example"]',
            "--ssl-cert-reqs",
            "0",
            "--max-num-queued-reqs",
            "7",
            "--disable-log-requests",
            "--generation-config",
            "vllm",
            "-tp",
            "2",
            "--gpu-memory-utilization",
            "0.9",
            "--enable-prefix-caching",
            "--enforce-eager",
            "-q",
            "bitsandbytes",
        ]  # fmt: skip
    )
    assert args.model_tag == "/models/x" and args.served_model_name == ["a", "b"]
    assert args.api_key == ["k1", "k2"] and args.allowed_origins == ("https://a.example",)
    assert args.max_queue_size == 7 and args.quantization == "bitsandbytes"
    assert ignored_flags_given(args) == [
        "--tensor-parallel-size", "--gpu-memory-utilization", "--enable-prefix-caching", "--enforce-eager"
    ]  # fmt: skip
    every = [names[0] for names, takes_value in IGNORED_FLAGS if not takes_value]
    assert len(ignored_flags_given(openai_parser().parse_args(every))) == len(every)


@pytest.mark.parametrize(("text", "length"), [("2048", 2048), ("1k", 1000), ("1K", 1024), ("25.6k", 25600)])
def test_max_model_len_sizes(text: str, length: int) -> None:
    assert parse_max_model_len(text) == length


def test_max_model_len_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="--max-model-len"):
        parse_max_model_len("lots")


def stream_in_thread(client: openai.OpenAI, first: threading.Event) -> Future[tuple[str | None, int]]:
    """A streamed chat answer in a thread: (finish reason, completion tokens); `first` set at its first chunk."""

    def run() -> tuple[str | None, int]:
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=64, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        finish, tokens = None, 0
        for chunk in stream:
            first.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return finish, tokens

    future: Future[tuple[str | None, int]] = Future()
    threading.Thread(target=lambda: future.set_result(run()), daemon=True).start()
    return future


def test_one_command_serves_the_readme_example_and_drains_on_sigterm(tiny_llada: Path) -> None:
    process, port, triton = start_vdiff(tiny_llada, "-tp", "1", "--shutdown-timeout", "60")
    try:
        assert 503 in wait_healthy(process, port)  # the port is bound before the model is ready
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
        completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
        assert completion.choices[0].finish_reason in ("stop", "length") and completion.model == "tiny"
        firsts = [threading.Event() for _ in range(4)]
        streams = [stream_in_thread(client, first) for first in firsts]
        assert all(first.wait(60) for first in firsts)
    finally:
        process.send_signal(signal.SIGTERM)
    # streams that started before SIGTERM all finish; a new request is refused meanwhile
    assert [future.result(timeout=120) for future in streams] == [("length", 64)] * 4
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "--tensor-parallel-size is accepted for vLLM compatibility and ignored" in output
    assert f"vdiff is serving the OpenAI API at http://127.0.0.1:{port}/v1" in output
    assert "[shutdown] drained" in output
    leftover = subprocess.run(["pgrep", "-f", "--", f"--grpc-port={triton.grpc_port}"], capture_output=True, text=True)
    assert leftover.returncode == 1, f"tritonserver outlived vdiff: {leftover.stdout}{leftover.stderr}"


def test_vdiff_exits_non_zero_when_triton_dies(tiny_llada: Path, tmp_path: Path) -> None:
    process, port, triton = start_vdiff(tiny_llada, "--workdir", str(tmp_path))
    try:
        wait_healthy(process, port)
        found = subprocess.run(["pgrep", "-f", "--", f"--grpc-port={triton.grpc_port}"], capture_output=True, text=True)
        for pid in found.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode not in (0, None), output
    assert "tritonserver died" in output and "tritonserver exited with code -9" in output
    assert processes_mentioning(str(tmp_path)) == []  # no backend stub outlived its server


def test_with_no_model_vdiff_serves_the_trained_demo_model() -> None:
    question = [{"role": "user", "content": QUESTION}]
    (offline,) = LLM().chat(question)  # the shipped default, in this process
    models, reply = ask_the_served_demo(question)
    assert models == ["vdiff-demo"]
    # through Triton, token for token what the offline engine answers, and that answer is right
    assert reply.choices[0].message.content == offline.text == ANSWER
    assert reply.choices[0].finish_reason == "stop"


def test_quantized_vdiff_answers_as_the_quantized_offline_engine() -> None:
    """`vdiff --quantization bitsandbytes` (vLLM's 4-bit NF4) serves the demo model quantized in
    the denoiser: the same tokens as the offline engine quantized alike, still the right answer."""
    question = [{"role": "user", "content": QUESTION}]
    (offline,) = LLM(quantization="bitsandbytes").chat(question)
    _, reply = ask_the_served_demo(question, "--quantization", "bitsandbytes")
    assert reply.choices[0].message.content == offline.text == ANSWER


def ask_the_served_demo(question: list[dict[str, str]], *flags: str) -> tuple[list[str], Any]:
    """`vdiff FLAGS` with no model: the served model ids and its reply at temperature 0; the
    command then drains on SIGTERM and exits 0."""
    process, port, _ = start_vdiff(None, *flags)
    try:
        wait_healthy(process, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
        models = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model="vdiff-demo", messages=question, temperature=0)
    finally:
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return models, reply


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantization", "awq"], "argument --quantization/-q: invalid choice: 'awq'"),
        (["-q", "bitsandbytes-8bit", "--bnb-4bit-quant-type", "fp4"], "apply to 4-bit quantization only"),
        (["-q", "bitsandbytes", "--batch-invariant"], "--batch-invariant: batch_invariant cannot be combined"),
        (["--bnb-4bit-compute-dtype", "float16"], "need --quantization"),
    ],
)
def test_bad_quantization_flags_stop_vdiff_before_triton_starts(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vdiff.serve.cli", *flags], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
