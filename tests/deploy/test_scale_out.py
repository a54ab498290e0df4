"""The rolling restart at small size, for real: two `vdiff` replicas of vdiff-tiny behind HAProxy
(deploy/haproxy/haproxy.cfg), a few Locust users through it, each replica restarted in turn under
load with no failed request, then one replica killed. perf/scale_out.py at its full size writes
perf/results/scale_out.{json,md}."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs HAProxy (apt-get install haproxy)")


def test_a_rolling_restart_under_load_fails_no_request(tmp_path: Path) -> None:
    out = tmp_path / "scale_out"
    small = "--model vdiff-tiny --users 3 --max-tokens 16 --run-time 180 --before 8 --crash-run-time 20"
    script = str(ROOT / "perf" / "scale_out.py")
    command = [sys.executable, script, *small.split(), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    restart, crash = report["rolling_restart"], report["crash"]
    assert restart["load"]["failed"] == 0 and restart["load"]["requests"] > 0, restart
    assert all(d["exit_code"] == 0 for d in restart["drains"].values()), restart["drains"]
    assert restart["after_s"] > 0 and restart["tokens_per_s"]["after"] > 0, restart
    # a crash fails at most what the killed replica had in flight, and the balancer notices
    assert crash["load"]["failed"] <= crash["in_flight_on_it"], crash
    assert crash["marked_down_after_s"] < 5, crash
