"""Run-wide fixtures: tiny checkpoints written once by tools/make_tiny_model.py.

Dtype is an explicit axis: the engine fixtures (`llm`, `llada_llm`, `dream_llm`,
`invariant_llm`) run every test that takes them in float32 and in bfloat16, on every machine
(bf16 arithmetic exists on every CPU; where it is emulated it is only slower). Nothing here
uses dtype "auto", whose outcome depends on the CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_tiny_model import make_tiny_model, parse_args  # noqa: E402
from proxy_harness import Proxy, proxy_config, running_proxy  # noqa: E402
from triton_harness import MAX_NUM_SEQS, MAX_QUEUE_SIZE, Server, start_server  # noqa: E402
from vdiff import LLM  # noqa: E402


def write_tiny(out: Path, arch: str, *extra: str) -> Path:
    return make_tiny_model(parse_args(["--arch", arch, "--out", str(out), *extra]))


def write_verifier(model_dir: Path, out: Path, max_positions: int = 512) -> Path:
    """A random 2-layer transformers Llama that reads the model's tokenizer: an APD verifier. Its
    logits cover the tokenizer's vocabulary only, so the diffusion model's wider logit rows are cut,
    as APD cuts Dream's to Qwen2.5's."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def copy_model(source: Path, tmp_path: Path) -> Path:
    """A private copy of a session checkpoint, for tests that damage or edit it."""
    return Path(shutil.copytree(source, tmp_path / "model"))


def edit_json(file: Path, remove: tuple[str, ...] = (), **changes: Any) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    for key in remove:
        del data[key]
    file.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny-llada"), "llada")


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny-dream"), "dream")


@pytest.fixture(scope="session", params=["llada", "dream"])
def tiny_model_dir(request: pytest.FixtureRequest, tiny_llada: Path, tiny_dream: Path) -> Path:
    return tiny_llada if request.param == "llada" else tiny_dream


@pytest.fixture(scope="session")
def tiny_llada_verifier(tiny_llada: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_verifier(tiny_llada, tmp_path_factory.mktemp("tiny-llada-verifier"))


DTYPES = ("float32", "bfloat16")
# The default mode's stated tolerance: how far a row's logits may move when the same canvas runs in
# another batch or window shape, times the row's largest |logit| (tests/engine/test_default_numerics.py).
LOGIT_RTOL = {"float32": 1e-4, "bfloat16": 0.25}
SERVED_DTYPE = "float32"  # the session tritonserver's; `served_llm` is its offline twin
EngineFactory = Callable[..., LLM]


@pytest.fixture(scope="session")
def tiny_dream_verifier(tiny_dream: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_verifier(tiny_dream, tmp_path_factory.mktemp("tiny-dream-verifier"))


@pytest.fixture(scope="session")
def engines(tiny_llada: Path, tiny_llada_verifier: Path, tiny_dream: Path, tiny_dream_verifier: Path) -> EngineFactory:
    """`engines(family, dtype, batch_invariant=False)`: one LLM per setting for the whole run,
    each with a tiny verifier, so that every algorithm (APD included) runs on both families."""
    models = {"llada": (tiny_llada, tiny_llada_verifier), "dream": (tiny_dream, tiny_dream_verifier)}
    built: dict[tuple[str, str, bool], LLM] = {}

    def get(family: str, dtype: str, batch_invariant: bool = False) -> LLM:
        key = (family, dtype, batch_invariant)
        if key not in built:
            model, verifier = models[family]
            built[key] = LLM(
                model=model, verifier=str(verifier), dtype=dtype, max_num_seqs=8, batch_invariant=batch_invariant
            )
        return built[key]

    return get


@pytest.fixture(scope="session", params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def llada_llm(engines: EngineFactory, dtype: str) -> LLM:
    return engines("llada", dtype)


@pytest.fixture(scope="session")
def dream_llm(engines: EngineFactory, dtype: str) -> LLM:
    return engines("dream", dtype)


@pytest.fixture(params=["llada", "dream"])
def llm(request: pytest.FixtureRequest, engines: EngineFactory, dtype: str) -> LLM:
    return engines(request.param, dtype)


@pytest.fixture(params=["llada", "dream"])
def invariant_llm(request: pytest.FixtureRequest, engines: EngineFactory, dtype: str) -> LLM:
    """The same engines in batch-invariant mode: a request's tokens never depend on its neighbours."""
    return engines(request.param, dtype, True)


@pytest.fixture(scope="session")
def served_llm(engines: EngineFactory) -> LLM:
    """The offline engine with the session tritonserver's settings, to compare served answers with."""
    return engines("llada", SERVED_DTYPE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a test id that says gpu
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def triton_server(
    tiny_llada: Path, tiny_llada_verifier: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A real tritonserver serving the model repository with the tiny LLaDA checkpoint and a verifier."""
    process = start_server(
        tiny_llada,
        tmp_path_factory.mktemp("triton"),
        dtype=SERVED_DTYPE,
        verifier=str(tiny_llada_verifier),
        max_num_seqs=str(MAX_NUM_SEQS),
        max_queue_size=str(MAX_QUEUE_SIZE),
    )
    yield Server(process.config.address, process)
    process.stop()
    process.wait(60)


@pytest.fixture(scope="session")
def proxy(triton_server: Server, tiny_llada: Path) -> Iterator[Proxy]:
    """The OpenAI server (in this process) in front of the session's tritonserver."""
    config = proxy_config(tiny_llada, triton_server.grpc, triton_server.metrics)
    with running_proxy(config) as running:
        yield running
