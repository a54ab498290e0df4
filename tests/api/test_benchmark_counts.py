"""Benchmark clients count what vdiff says it generated.

genai-perf drives perf_analyzer and counts output tokens by re-tokenizing the text it received,
so with `ignore_eos` an answer must be `max_tokens` real tokens, not EOS padding that the text
leaves out. Here perf_analyzer itself runs against the `vdiff` command serving the demo model,
through the Triton ensemble (gRPC streaming, as genai-perf's tensorrtllm backend) and through the
OpenAI chat endpoint (streaming), and every answer it exported is re-tokenized as genai-perf does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from command_harness import served_vdiff
from vdiff.tokenizer import Tokenizer

MAX_TOKENS = 16
QUESTIONS = ["What is 12 + 30?", "Reverse the word cat.", "Sort these digits: 3 1 2.", "Spell dog."]
FIELDS = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0, "threshold": 0.95}


def perf_analyzer_env() -> dict[str, str]:
    """The tritonclient wheel's perf_analyzer links libcudart.so.12, even against a CPU server."""
    import nvidia.cuda_runtime

    paths = [str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"), os.environ.get("LD_LIBRARY_PATH")]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, paths))}


def perf_analyzer(*arguments: str, export: Path) -> list[dict[str, Any]]:
    """perf_analyzer's exported requests, each with its response outputs."""
    binary = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    command = [binary, *arguments, "--concurrency-range=2:2", "--request-count=8",
               "--profile-export-file", str(export)]  # fmt: skip
    done = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    requests: list[dict[str, Any]] = json.loads(export.read_text())["experiments"][0]["requests"]
    return requests


def sse_text(outputs: list[dict[str, Any]]) -> str:
    """The content of an exported chat stream (each output holds raw `data: {...}` events)."""
    text = []
    for output in outputs:
        for line in output["response"].splitlines():
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: ") :])["choices"]:
                    text.append(choice["delta"].get("content") or "")
    return "".join(text)


@pytest.fixture(scope="module")
def demo_server() -> Any:
    with served_vdiff() as served:
        yield served


def test_ignore_eos_answers_count_max_tokens_through_the_ensemble(demo_server: Any, tmp_path: Path) -> None:
    _, triton = demo_server
    rows = [{"text_input": [q], **{k: [v] for k, v in FIELDS.items()}, "stream": [True]} for q in QUESTIONS]
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps({"data": rows}))
    arguments = ("-m", "vdiff", "-i", "grpc", "--streaming", "-u", triton.grpc_target, "--input-data", str(data),
                 "--shape", "text_input:1")  # fmt: skip
    requests = perf_analyzer(*arguments, export=tmp_path / "export.json")
    tokenizer = Tokenizer.load("vdiff-demo")
    counts = [len(tokenizer.encode("".join(o["text_output"] for o in r["response_outputs"]))) for r in requests]
    assert len(counts) >= 8 and counts == [MAX_TOKENS] * len(counts)


def test_ignore_eos_answers_count_max_tokens_through_openai_chat(demo_server: Any, tmp_path: Path) -> None:
    port, _ = demo_server
    payloads = [{"payload": [{"model": "vdiff-demo", "messages": [{"role": "user", "content": q}],
                              "stream": True, **FIELDS}]} for q in QUESTIONS]  # fmt: skip
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps({"data": payloads}))
    arguments = ("-m", "vdiff-demo", "--service-kind", "openai", "--endpoint", "v1/chat/completions", "-i", "http",
                 "-u", f"127.0.0.1:{port}", "--async", "--input-data", str(data))  # fmt: skip
    requests = perf_analyzer(*arguments, export=tmp_path / "export.json")
    tokenizer = Tokenizer.load("vdiff-demo")
    counts = [len(tokenizer.encode(sse_text(r["response_outputs"]))) for r in requests]
    assert len(counts) >= 8 and counts == [MAX_TOKENS] * len(counts)
