#!/usr/bin/env bash
# perf/gpu_check.sh: the prepared GPU check, one command on a machine with a CUDA GPU.
#
# Why one script: GPU time comes in short leases (15 minutes, started bare, no internet), so
# everything that needs CUDA runs in one go, each step under its own timeout, with a summary
# that says which steps and tests passed, failed or were skipped, and why.
#   1. the carried wheels (.whl/), installed only if a package vdiff or its tests import is
#      missing: the GPU image has torch, transformers 5 and pytest, but not fastapi, pydantic,
#      uvicorn, tritonclient or bitsandbytes (vdiff runs from the tree via PYTHONPATH);
#   2. versions: nvidia-smi, python, torch, transformers, bitsandbytes, flash-attn;
#   3. the `gpu` tests (tests/gpu, tests/models): log, JUnit XML, skip reasons;        <= 130 s
#   4. perf/bench_quant.py on CUDA (bf16, 8-bit, NF4; its demo, not its realistic model); <= 100 s
#   5. perf/bench_gpu.py: the LLaDA-8B-shaped engine benchmark (bf16, then NF4 if time); <= 160 s
# Worst case, every step killed at its limit (+10 s grace each): about 7.5 minutes.
# Everything lands in $OUT (default perf/results/gpu-local): gpu_check.log, tests.xml,
# quant_cuda.{json,md}, gpu_scale.{json,md}, summary.txt. Exit status 1 if any step failed.
#
# Through the device tool, from the repository root:
#   here, once (needs the package index; 19 MiB, ignored by git via .git/info/exclude):
#       PYTHON=.venv/bin/python bash perf/gpu_check.sh --prepare-wheels
#   then:  run(command="bash perf/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Without a GPU (this CPU box) every CUDA step is skipped with its reason and the summary
# still comes out: OUT=/tmp/gpucheck bash perf/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
WHEELS=${WHEELS:-$ROOT/.whl}  # override only to try other wheels
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1

# What travels as wheels (cp312, manylinux x86_64), pinned to the versions vdiff is tested with.
PLAIN_WHEELS=(
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5
    annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 uvicorn==0.55.0
    prometheus-fastapi-instrumentator==8.1.0 python-rapidjson==1.25
)
SLIM_WHEELS=(tritonclient==2.51.0 bitsandbytes==0.50.2)
# Modules whose absence calls for the wheels: vdiff imports the first three (through
# vdiff_client), tests/conftest.py the next four, the quantization steps the last.
NEEDED_MODULES="fastapi starlette pydantic uvicorn tritonclient.grpc.aio"
NEEDED_MODULES+=" prometheus_fastapi_instrumentator rapidjson bitsandbytes"

prepare_wheels() {
    # Download the wheels for the GPU box and cut what it cannot use: tritonclient's perf_analyzer
    # binaries (40 MB) and bitsandbytes' libraries for other CUDA majors, ROCm and XPU (114 MB),
    # keeping its CPU library and CUDA 12.8, 13.0 and 13.2 (the image's torch is cu130).
    mkdir -p "$WHEELS"
    local platforms=()
    local tag
    for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
        manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$WHEELS" "${PLAIN_WHEELS[@]}" \
        "${SLIM_WHEELS[@]}" || return 1
    "$PYTHON" - "$WHEELS" <<'PY'
"""Rewrite two wheels without the files the GPU box never loads; RECORD loses their lines."""
import sys
import zipfile
from pathlib import Path

DROP = {
    "tritonclient": lambda name: "/data/bin/" in name,
    "bitsandbytes": lambda name: name.endswith(".so")
    and not name.endswith(("_cpu.so", "_cuda128.so", "_cuda130.so", "_cuda132.so")),
}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    drop = DROP.get(wheel.name.split("-")[0])
    if drop is None:
        continue
    slim = wheel.with_suffix(".slim")
    source, target = zipfile.ZipFile(wheel), zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED)
    with source, target:
        for item in source.infolist():
            if drop(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines() if not drop(line.split(",")[0])]
                data = ("\n".join(kept) + "\n").encode()
            target.writestr(item, data)
    slim.replace(wheel)
    print(f"slimmed {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB")
PY
    du -ch "$WHEELS"/*.whl | tail -1
}

if [ "${1:-}" = "--prepare-wheels" ]; then
    prepare_wheels
    exit $?
fi

OUT=${OUT:-$ROOT/perf/results/gpu-local}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SUMMARY=()   # "step|status|seconds|detail"
HAS_CUDA=0
HAS_BNB=0
TEST_REPORT=""

note() { printf '\n==== %s ====\n' "$*"; }

record() { SUMMARY+=("$1|$2|$3|$4"); }

# run_step NAME LIMIT_S COMMAND...: run under a timeout, record passed/failed/timed out.
run_step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    note "$name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@"
    rc=$?
    local took=$((SECONDS - start))
    case $rc in
        0) record "$name" passed "$took" "" ;;
        124 | 137) record "$name" "timed out" "$took" "killed after ${limit}s" ;;
        *) record "$name" failed "$took" "exit status $rc" ;;
    esac
    return $rc
}

versions() {
    note "machine"
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PYTHON" - <<'PY'
import importlib, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
NAMES = ("torch", "transformers", "tokenizers", "bitsandbytes", "flash_attn", "pytest", "numpy")
for name in NAMES:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # a broken install is as useful to see as a missing one
        print(f"{name}: not importable ({type(error).__name__}: {error})")
try:
    import torch
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        print(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name(0)}, bf16 {bf16}")
    else:
        print("cuda: torch sees no CUDA device")
except Exception as error:
    print(f"cuda: unknown ({error})")
PY
}

missing_modules() {
    "$PYTHON" - $NEEDED_MODULES <<'PY'
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
PY
}

install_wheels() {
    note "carried wheels"
    local missing site start=$SECONDS
    missing=$(missing_modules)
    if [ -z "$missing" ]; then
        echo "every module vdiff and its tests import is here; carried wheels not needed"
        record wheels skipped 0 "nothing missing"
        return 0
    fi
    echo "missing: $missing"
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        record wheels failed 0 "missing $missing; no .whl/ (--prepare-wheels here, carry .whl)"
        return 1
    fi
    site=${TMPDIR:-/tmp}/vdiff-gpu-site
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl; then
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
        missing=$(missing_modules)
        if [ -z "$missing" ]; then
            record wheels passed $((SECONDS - start)) "installed into $site"
        else
            record wheels failed $((SECONDS - start)) "still missing after install: $missing"
        fi
    else
        record wheels failed $((SECONDS - start)) "pip install --no-index of .whl/ failed"
    fi
}

probe() {
    # What later steps depend on: vdiff importable from the tree, CUDA, bitsandbytes on it.
    export PYTHONPATH=$ROOT:$ROOT/client${PYTHONPATH:+:$PYTHONPATH}
    note "probe"
    if "$PYTHON" -c "import vdiff, vdiff.models.quantization as q; print('vdiff from', q.__file__)"
    then
        record "import vdiff" passed 0 ""
    else
        record "import vdiff" failed 0 "vdiff does not import (see the log)"
    fi
    if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        HAS_CUDA=1
    fi
    if [ $HAS_CUDA = 1 ] && "$PYTHON" -c "
import torch, bitsandbytes as bnb
w = torch.randn(64, 64, device='cuda', dtype=torch.bfloat16)
q, state = bnb.functional.quantize_4bit(w, quant_type='nf4')
assert bnb.functional.dequantize_4bit(q, state).shape == w.shape
print('bitsandbytes', bnb.__version__, 'quantizes on CUDA')"; then
        HAS_BNB=1
    fi
    echo "cuda: $HAS_CUDA, bitsandbytes on cuda: $HAS_BNB"
}

tests() {
    if ! run_step "gpu tests" 130 "$PYTHON" -m pytest -m gpu -rs -v -p no:cacheprovider \
        --continue-on-collection-errors --junitxml="$OUT/tests.xml" tests/gpu tests/models; then
        :  # recorded; the summary below says which tests failed
    fi
    [ -f "$OUT/tests.xml" ] || return 0
    TEST_REPORT=$("$PYTHON" - "$OUT/tests.xml" <<'PY'
"""Counts, every skip reason with how many tests it skipped, and the failed tests' names."""
import collections
import sys
import xml.etree.ElementTree as ET

counts, reasons, failed = collections.Counter(), collections.Counter(), []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    kinds = {child.tag: child for child in case}
    name = f"{case.get('classname')}::{case.get('name')}"
    if "skipped" in kinds:
        counts["skipped"] += 1
        reasons[kinds["skipped"].get("message", "").strip()] += 1
    elif "failure" in kinds or "error" in kinds:
        counts["failed"] += 1
        failed.append(name)
    else:
        counts["passed"] += 1
print(f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
for reason, count in reasons.most_common():
    print(f"  skipped {count}: {reason}")
for name in failed:
    print(f"  FAILED {name}")
PY
)
    echo "$TEST_REPORT"
}

quant_bench() {
    local variants=bfloat16,8bit,nf4
    if [ $HAS_CUDA = 0 ]; then
        record "quant bench" skipped 0 "no CUDA device"
        return
    fi
    if [ ! -f perf/bench_quant.py ]; then
        record "quant bench" skipped 0 "perf/bench_quant.py is not in this tree"
        return
    fi
    if [ $HAS_BNB = 0 ]; then
        variants=bfloat16
        echo "bitsandbytes cannot quantize on CUDA here: 8-bit and NF4 left out"
    fi
    run_step "quant bench ($variants)" 100 "$PYTHON" perf/bench_quant.py --device cuda \
        --per-family 10 --variants "$variants" --skip-realistic --out "$OUT/quant_cuda"
}

scale_bench() {
    local variants=bfloat16,nf4
    if [ $HAS_CUDA = 0 ]; then
        record "LLaDA-8B-shape bench" skipped 0 "no CUDA device"
        return
    fi
    [ $HAS_BNB = 1 ] || variants=bfloat16
    run_step "LLaDA-8B-shape bench ($variants)" 160 "$PYTHON" perf/bench_gpu.py --device cuda \
        --variants "$variants" --budget-s 130 --out "$OUT/gpu_scale"
}

summary() {
    # Built outside any pipe, so that `failed` survives to the exit status.
    local line name status took detail failed=0 commit text
    note "summary"
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
    text="gpu_check at $commit, $(date -u +%FT%TZ)"
    for line in "${SUMMARY[@]}"; do
        IFS='|' read -r name status took detail <<<"$line"
        text+=$'\n'$(printf '%-34s %-10s %4ss  %s' "$name" "$status" "$took" "$detail")
        case $status in failed | "timed out") failed=1 ;; esac
    done
    [ -z "$TEST_REPORT" ] || text+=$'\n'$TEST_REPORT
    text+=$'\n'"total ${SECONDS}s; results in $OUT"
    echo "$text" | tee "$OUT/summary.txt"
    return $failed
}

main() {
    install_wheels
    versions
    probe
    tests
    quant_bench
    scale_bench
    summary
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
