"""Raw load samples (collected in the Locust process) and the JSON report the runner makes of them.

Percentiles come from the raw samples (linear interpolation between closest ranks), not from
Locust's rounded response-time buckets.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# metric -> unit; Locust sees each as a `request_type="LLM"` event whose response_time is the value
METRIC_UNITS = {
    "ttft": "ms",  # request sent -> first chunk with text or tokens (see stream.py)
    "itl": "ms",  # gap between such chunks / tokens in the later one
    "tpot": "ms",  # (last chunk - first chunk) / tokens after the first chunk, per request
    "e2e": "ms",  # request sent -> [DONE] (or the whole body without stream)
    "output_tokens": "tokens",  # the final usage's completion_tokens
    "chunk_tokens": "tokens",  # tokens per chunk with text or tokens
    "tokens_per_s": "tokens/s",  # output_tokens / e2e, per request
}


@dataclass
class Tally:
    """Everything one Locust process counted; written as JSON when Locust quits."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in METRIC_UNITS})
    requests: Counter[str] = field(default_factory=Counter)  # by request name, every finished attempt
    failures: Counter[str] = field(default_factory=Counter)  # by reason
    rejections: Counter[str] = field(default_factory=Counter)  # by HTTP status (429, 503)
    retry_after: list[float] = field(default_factory=list)  # seconds, from rejections' Retry-After
    usage_mismatches: int = 0  # continuous usage count != final usage (a warning, not a failure)
    started: float | None = None  # time.time() at test start
    stopped: float | None = None  # time.time() once every user has stopped

    def add(self, metric: str, value: float) -> None:
        self.samples[metric].append(value)

    def write(self, path: Path) -> None:
        # not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs
        path.write_text(json.dumps({item.name: getattr(self, item.name) for item in fields(self)}))

    @classmethod
    def read(cls, path: Path) -> Tally:
        data = json.loads(path.read_text())
        for name in ("requests", "failures", "rejections"):
            data[name] = Counter(data[name])
        return cls(**data)


def percentile(ordered: list[float], share: float) -> float:
    """Linear interpolation between the closest ranks of sorted samples (numpy's default)."""
    position = share * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: list[float], unit: str) -> dict[str, Any]:
    if not values:
        return {"unit": unit, "count": 0}
    ordered = sorted(values)
    summary = {"mean": statistics.fmean(ordered), "min": ordered[0], "max": ordered[-1]}
    summary |= {f"p{round(share * 100)}": percentile(ordered, share) for share in (0.5, 0.9, 0.99)}
    return {"unit": unit, "count": len(ordered)} | {key: round(value, 3) for key, value in summary.items()}


def build_report(tally: Tally, settings: dict[str, Any]) -> dict[str, Any]:
    """The run's JSON report: settings, counts, throughput and one summary per metric."""
    duration = (tally.stopped or 0.0) - (tally.started or 0.0)
    total = sum(tally.requests.values())
    failed, rejected = sum(tally.failures.values()), sum(tally.rejections.values())
    succeeded = total - failed - rejected
    output_tokens = int(sum(tally.samples["output_tokens"]))
    return {
        "settings": settings,
        "duration_s": round(duration, 3),
        "requests": {"total": total, "succeeded": succeeded, "by_name": dict(tally.requests)},
        "failures": {"total": failed, "by_reason": dict(tally.failures)},
        "rejections": {
            "total": rejected,
            "by_status": dict(tally.rejections),
            "retry_after_s": summarize(tally.retry_after, "s"),
        },
        "usage_mismatches": tally.usage_mismatches,
        "output_tokens": output_tokens,
        "throughput": {
            "requests_per_s": round(succeeded / duration, 3) if duration > 0 else 0.0,
            "output_tokens_per_s": round(output_tokens / duration, 3) if duration > 0 else 0.0,
        },
        "metrics": {name: summarize(tally.samples[name], unit) for name, unit in METRIC_UNITS.items()},
    }
