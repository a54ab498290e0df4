"""Nothing a client sends stalls the proxy's event loop: tokenizer work runs in worker threads.

The load runs in a separate process: this process holds the proxy, and a client here parsing
megabytes of JSON would take the GIL from the proxy's event loop, which is not what is measured.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy_harness import SERVED, Proxy, proxy_config, running_proxy
from triton_harness import Server

HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": SERVED[0], "messages": HI, "max_tokens": 128, "ignore_eos": True}
BIG_PROMPT_CHARS = 1_700_000  # about 1.3 s of tokenizing each on this project's 2-core machine
LOADS = 4
Load = subprocess.Popen[str]
KEY = {"Authorization": "Bearer key"}
# posts LOADS big /tokenize requests at once; prints when it starts, then each one's outcome
LOAD_SCRIPT = """
import asyncio, json, random, sys, time
import httpx

url, chars, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
words = ["alpha", "beta", "gamma", "delta", "hello", "world", "the", "quick"]
prompt = " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(chars // 6))[:chars]


async def main():
    async with httpx.AsyncClient(timeout=300) as http:
        async def one():
            answer = await http.post(url, json={"prompt": prompt, "return_token_strs": True})
            return answer.status_code, len(answer.content), time.monotonic()

        print(json.dumps({"sending": time.monotonic()}), flush=True)
        print(json.dumps(await asyncio.gather(*(one() for _ in range(count)))), flush=True)


asyncio.run(main())
"""


@pytest.fixture(scope="module")
def long_context(triton_server: Server, tiny_llada: Path) -> Iterator[Proxy]:
    """A proxy whose --max-model-len admits megabyte prompts: /tokenize really tokenizes them."""
    config = proxy_config(tiny_llada, triton_server.grpc, None, max_model_len=4_000_000)
    with running_proxy(config) as proxy:
        yield proxy


def chat_seconds(proxy: Proxy, http: httpx.Client) -> float:
    started = time.monotonic()
    answer = http.post(f"{proxy.v1}/chat/completions", json=CHAT)
    assert answer.status_code == 200, answer.text
    return time.monotonic() - started


def median_chat_seconds(proxy: Proxy, http: httpx.Client, runs: int = 5) -> float:
    return statistics.median(chat_seconds(proxy, http) for _ in range(runs))


def chats_while_running(proxy: Proxy, http: httpx.Client, load: Load) -> list[tuple[float, float]]:
    """(start, seconds) of chats sent one after another while the load runs (a minute at most)."""
    chats = []
    deadline = time.monotonic() + 60
    while load.poll() is None and time.monotonic() < deadline:
        chats.append((time.monotonic(), chat_seconds(proxy, http)))
    return chats


def start_load(proxy: Proxy) -> Load:
    """LOADS big /tokenize requests at once from another process, once they are on their way."""
    arguments = [f"{proxy.url}/tokenize", str(BIG_PROMPT_CHARS), str(LOADS)]
    command = [sys.executable, "-c", LOAD_SCRIPT, *arguments]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert load.stdout is not None
    json.loads(load.stdout.readline())
    time.sleep(0.3)  # for the bodies to arrive
    return load


def test_big_tokenize_requests_leave_chat_fast(long_context: Proxy) -> None:
    """Before the tokenizer lanes, a chat beside this load waited it out (6.1 to 6.5 s)."""
    with httpx.Client(timeout=120) as http:
        chat_seconds(long_context, http)  # warm: the capacity read, the first gRPC channel
        idle = median_chat_seconds(long_context, http)
        load = start_load(long_context)
        chats = chats_while_running(long_context, http, load)
        assert load.stdout is not None
        results = json.loads(load.stdout.readline())
    assert all(status == 200 and size > 1_000_000 for status, size, _ in results), results
    # monotonic clocks agree across processes: the chats sent while /tokenize answers were due
    last_answer = max(done for _, _, done in results)
    during = [seconds for started, seconds in chats if started < last_answer]
    busy = statistics.median(during or [0])
    print(f"chat idle {idle:.3f} s; {len(during)} beside {LOADS} big /tokenize: {busy:.3f} s")
    assert busy <= 2 * idle, f"beside the load: {during} s; idle {idle:.3f} s"
    assert len(during) >= 3, f"only {len(during)} chats were sent while the load ran: {during}"


def test_tokenize_and_detokenize_inputs_are_bounded(proxy: Proxy) -> None:
    prompt = "word " * 380_000  # 1.9 MB: must exceed the context, so it is not tokenized
    started = time.monotonic()
    body = {"prompt": prompt, "return_token_strs": True}
    answer = httpx.post(f"{proxy.url}/tokenize", json=body)
    assert answer.status_code == 400 and time.monotonic() - started < 1
    error = answer.json()["error"]
    assert error["param"] == "prompt" and "maximum context length is" in error["message"]
    too_many = [5] * (proxy.config.max_model_len + 1)
    answer = httpx.post(f"{proxy.url}/detokenize", json={"tokens": too_many})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "tokens"
    limit = proxy.config.max_model_len
    assert f"tokens must hold at most {limit} token ids" in answer.json()["error"]["message"]
    fits = httpx.post(f"{proxy.url}/detokenize", json={"tokens": too_many[1:]})
    assert fits.status_code == 200 and fits.json()["prompt"]


def test_tokenize_and_detokenize_need_the_api_key(triton_server: Server, tiny_llada: Path) -> None:
    config = proxy_config(tiny_llada, triton_server.grpc, None, api_keys=("key",))
    bodies = {"/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [5, 6]}}
    with running_proxy(config) as guarded:
        for path, body in bodies.items():
            assert httpx.post(f"{guarded.url}{path}", json=body).status_code == 401
            keyed = httpx.post(f"{guarded.url}{path}", json=body, headers=KEY)
            assert keyed.status_code == 200, keyed.text
        assert httpx.get(f"{guarded.url}/version").status_code == 200


def test_tokenizer_info_is_served_with_its_flag_behind_the_key(
    proxy: Proxy, triton_server: Server, tiny_llada: Path
) -> None:
    """vLLM's GET /tokenizer_info (lm-eval's local-completions reads it): the tokenizer's settings,
    class and chat template, without the paths of its files; only with the flag, as in vLLM."""
    from transformers import AutoTokenizer

    assert httpx.get(f"{proxy.url}/tokenizer_info").status_code == 404
    hf = AutoTokenizer.from_pretrained(tiny_llada)
    config = proxy_config(tiny_llada, triton_server.grpc, None, api_keys=("key",), enable_tokenizer_info_endpoint=True)
    with running_proxy(config) as served:
        assert httpx.get(f"{served.url}/tokenizer_info").status_code == 401
        answer = httpx.get(f"{served.url}/tokenizer_info", headers=KEY)
    assert answer.status_code == 200, answer.text
    info = answer.json()
    assert info["tokenizer_class"] == type(hf).__name__
    assert info["chat_template"] == hf.chat_template
    assert info["eos_token"] == hf.eos_token and info["model_max_length"] == hf.model_max_length
    assert not {"vocab_file", "merges_file", "tokenizer_file", "name_or_path"} & info.keys()
    assert str(tiny_llada) not in answer.text
