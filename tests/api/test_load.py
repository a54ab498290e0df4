"""`vdiff-load` (Locust, headless) against the real proxy and tritonserver: sound reports, rejections, loopback only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clients import read_metric
from proxy_harness import SERVED, Proxy
from triton_harness import MAX_NUM_SEQS, MAX_QUEUE_SIZE
from vdiff_client.load.options import is_loopback
from vdiff_client.load.runner import LOCUSTFILE, main, timespan_seconds
from vdiff_client.load.stream import StreamReader

SHORT = ["--model", SERVED[0], "--ignore-eos", "--spawn-rate", "0", "--quiet"]
GENERATED = f'vllm:generation_tokens_total{{engine="0",model_name="{SERVED[0]}"}}'


def run_load(proxy: Proxy, out: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["--host", proxy.url, "--out", str(out), *SHORT, *args])
    return code, json.loads(out.read_text())


def assert_ordered(summary: dict[str, Any]) -> None:
    assert summary["count"] > 0, summary
    assert summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"], summary


def test_a_short_run_reports_ordered_percentiles_and_exact_tokens(proxy: Proxy, tmp_path: Path) -> None:
    before = read_metric(f"{proxy.url}/metrics", GENERATED)
    mix = ["--non-stream-share", "0.2", "--models-share", "0.05", "--extra-body", '{"block_length": 8}']
    code, report = run_load(
        proxy, tmp_path / "load.json", "--users", "3", "--run-time", "5s", "--max-tokens", "32", *mix
    )
    generated = read_metric(f"{proxy.url}/metrics", GENERATED) - before
    assert code == 0 and report["locust_exit_code"] == 0
    assert report["failures"] == {"total": 0, "by_reason": {}} and report["rejections"]["total"] == 0
    assert {"chat_stream", "completion_stream"} <= set(report["requests"]["by_name"])
    for name in ("ttft", "itl", "tpot", "e2e", "tokens_per_s", "chunk_tokens"):
        assert_ordered(report["metrics"][name])
    tokens = report["metrics"]["output_tokens"]
    assert tokens["min"] == tokens["max"] == 32  # ignore_eos: every answer's usage says max_tokens
    assert report["output_tokens"] == 32 * tokens["count"] == generated  # what the server counted
    assert report["usage_mismatches"] == 0  # continuous usage added up to the final usage
    assert report["duration_s"] > 3 and report["throughput"]["output_tokens_per_s"] > 0
    assert report["settings"]["users"] == 3 and "api_key" not in report["settings"]


def test_more_users_than_capacity_are_rejections_not_failures(proxy: Proxy, tmp_path: Path) -> None:
    users = 2 * (MAX_NUM_SEQS + MAX_QUEUE_SIZE)
    code, report = run_load(proxy, tmp_path / "load.json", "--users", str(users), "--run-time", "5s",
                            "--max-tokens", "64", "--non-stream-share", "0.3", "--models-share", "0")  # fmt: skip
    assert code == 0 and report["failures"]["total"] == 0
    assert report["rejections"]["by_status"]["503"] > 0 and set(report["rejections"]["by_status"]) == {"503"}
    assert report["rejections"]["retry_after_s"]["p50"] == 1  # the proxy's Retry-After
    assert report["requests"]["succeeded"] > 0 and report["metrics"]["output_tokens"]["min"] == 64


def test_remote_targets_are_refused_before_any_load(tmp_path: Path) -> None:
    command = Path(sys.executable).parent / "vdiff-load"
    refused = subprocess.run([command, "--host", "http://192.0.2.7:8000", "--run-time", "1s"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "refusing to load http://192.0.2.7:8000" in refused.stderr
    direct = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-t", "1s",
                             "--host", "https://example.com"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert direct.returncode == 2 and "only loopback targets" in direct.stderr


def test_stream_reading_frames_events_and_divides_gaps_by_tokens() -> None:
    clock = iter([0.1, 0.3, 0.7, 0.8, 0.9]).__next__
    reader = StreamReader(0.0, clock)
    chunk = 'data: {"choices": [{"text": "%s"}], "usage": {"completion_tokens": %d}}\n\n'
    usage = 'data: {"choices": [], "usage": {"completion_tokens": 6}}\n\n'
    # the second chunk has tokens but no text yet (a block ending inside a character): it delivers
    body = ": keep-alive\r\n\r\n" + chunk % ("", 0) + chunk % ("", 2) + chunk % ("é", 6) + usage
    raw = (body + 'data: [DONE]\n\ndata: {"late": 1}\n\n').encode()
    for start in range(0, len(raw), 7):  # split anywhere, inside events and inside the two-byte é
        reader.feed(raw[start : start + 7])
    result = reader.result
    assert result.failure is None and result.ttft == 0.3 and result.e2e == 0.9 and result.output_tokens == 6
    assert result.chunk_tokens == [2, 4] and result.itl == pytest.approx([0.1])  # (0.7 - 0.3) / 4 tokens
    assert result.tpot == pytest.approx(0.1)
    broken = StreamReader(0.0, lambda: 1.0)
    broken.feed(b'data: {"error": {"message": "boom", "code": 500}}\n\n')
    assert broken.result.failure == "error event: boom"
    silent = StreamReader(0.0, lambda: 1.0)
    silent.feed(b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\ndata: [DONE]\n\n')
    assert silent.result.failure == "no content"
    assert StreamReader(0.0).result.failure == "stream ended without [DONE]"


def test_loopback_and_time_span_rules() -> None:
    assert all(map(is_loopback, ["http://127.0.0.1:8000", "http://localhost", "http://[::1]:80", "127.0.0.2:1"]))
    assert not any(map(is_loopback, ["http://10.0.0.1", "https://example.com", "http://127.0.0.1.example.com"]))
    assert [timespan_seconds(text) for text in ("90", "45s", "2m", "1h30m")] == [90, 45, 120, 5400]
