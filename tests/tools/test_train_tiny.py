"""tools/train_tiny.py end to end at toy size: real checkpoints both runtimes load, progress, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from vdiff import LLM

TOY = ["--steps", "4", "--ar-steps", "4", "--batch", "4", "--warmup", "2", "--layers", "1", "--hidden", "32",
       "--heads", "2", "--intermediate", "64", "--ar-layers", "1", "--ar-hidden", "32", "--ar-heads", "2",
       "--ar-intermediate", "64", "--eval-every", "2", "--eval-per-family", "1", "--log-every", "2",
       "--threads", "1"]  # fmt: skip


def train(out: Path) -> str:
    command = [sys.executable, str(ROOT / "tools" / "train_tiny.py"), *TOY,
               "--llada-out", str(out / "demo"), "--ar-out", str(out / "demo-ar")]  # fmt: skip
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=300).stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("train")
    return out, train(out)


def test_progress_lines_report_loss_and_held_out_accuracy(trained: tuple[Path, str]) -> None:
    _, log = trained
    assert "vdiff-demo [##########..........] 2/4" in log and "loss" in log
    assert "held-out add" in log and "vdiff-demo saved to" in log and "vdiff-demo-ar saved to" in log


def test_diffusion_checkpoint_loads_in_vdiff_with_its_decoding_defaults(trained: tuple[Path, str]) -> None:
    out, _ = trained
    generation = json.loads((out / "demo" / "generation_config.json").read_text())
    schedule = {"alg": "low_confidence", "steps": 72, "max_new_tokens": 72, "temperature": 0.0}
    assert generation | schedule == generation  # one token per step over the help answer's length
    config = json.loads((out / "demo" / "config.json").read_text())
    assert (config["torch_dtype"], config["max_sequence_length"]) == ("bfloat16", 160)
    (output,) = LLM(model=out / "demo", device="cpu").chat([{"role": "user", "content": "Spell: abc"}])
    assert output.nfe >= 1 and output.finish_reason in ("stop", "length")


def test_verifier_checkpoint_loads_in_transformers_with_the_same_tokenizer(trained: tuple[Path, str]) -> None:
    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out / "demo-ar")
    assert model.config.model_type == "llama"
    ids = [AutoTokenizer.from_pretrained(out / d)("Sort: 3 1 2").input_ids for d in ("demo", "demo-ar")]
    assert ids[0] == ids[1]


def test_same_seed_gives_the_same_checkpoints(trained: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = trained
    train(tmp_path)
    for name in ("demo", "demo-ar"):
        assert (out / name / "model.safetensors").read_bytes() == (tmp_path / name / "model.safetensors").read_bytes()
