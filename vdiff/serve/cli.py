"""The `vdiff` command: vLLM's `vllm serve`, backed by Triton.

vdiff [serve] [MODEL] [--model PATH|NAME] [--port 8000] [vllm serve flags] [-- TRITON ARGS]
vdiff triton [--model PATH|NAME] [--triton-http-port 8100] ...   Triton alone
vdiff triton-env DIR                                             environment for a bare tritonserver
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vdiff.assets import DEFAULT_MODEL
from vdiff.config import BATCH_INVARIANT_QUANTIZED, DEFAULT_MAX_STOP_STRINGS
from vdiff.models.checkpoint import Checkpoint, resolve_model_dir
from vdiff.models.loader import select_device
from vdiff.models.quantization import (
    COMPUTE_DTYPES,
    METHODS,
    QUANT_TYPES,
    QuantizationFlags,
    plan_for_checkpoint,
)
from vdiff.serve.launcher import LaunchConfig, ServerAddress, TritonProcess, supervise
from vdiff.serve.repository import render_repository
from vdiff.serve.stack import run_stack
from vdiff.serve.tritonserver import TritonNotFoundError, find_tritonserver, server_environment
from vdiff_client.args import add_frontend_arguments, add_ignored_arguments, add_model_arguments
from vdiff_client.cli import build_proxy, make_server

COMMANDS = ("serve", "triton", "triton-env")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`vdiff triton`: the model, the engine, and Triton's own addresses (`--host` is Triton's)."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model directory, Hub id or shipped name ({DEFAULT_MODEL})"
    )
    model.add_argument("--tokenizer", default="", help="separate tokenizer directory or Hub id")
    model.add_argument("--trust-remote-code", action="store_true")
    add_engine_arguments(parser)
    add_triton_arguments(parser, "--host")


def model_parameters(args: argparse.Namespace) -> dict[str, str]:
    """The config.pbtxt parameters for these arguments."""
    return {
        "model": args.model,
        "tokenizer": args.tokenizer or "",
        "verifier": args.verifier or "",
        "batch_invariant": str(args.batch_invariant).lower(),
        "dtype": args.dtype,
        "device": args.device,
        "quantization": args.quantization or "",
        "bnb_4bit_quant_type": args.bnb_4bit_quant_type or "",
        "bnb_4bit_compute_dtype": args.bnb_4bit_compute_dtype,
        "trust_remote_code": str(args.trust_remote_code).lower(),
        "max_num_seqs": str(args.max_num_seqs),
        "max_queue_size": str(args.max_queue_size),
        "max_num_batched_tokens": "" if args.max_num_batched_tokens is None else str(args.max_num_batched_tokens),
        "torch_num_threads": str(args.torch_num_threads),
        "seed": str(args.seed),
        # the proxy's flag, where the command has it, so the engine's bound is never the tighter
        "max_stop_strings": str(getattr(args, "max_stop_sequences", DEFAULT_MAX_STOP_STRINGS)),
        "shutdown_timeout_s": str(args.exit_timeout),
    }


def check_quantization(args: argparse.Namespace) -> None:
    """The quantization flags' refusals, before Triton starts rather than as a failed model load
    in its log: a bad combination, a device bitsandbytes cannot run on, bitsandbytes missing,
    another method than a quantized checkpoint's."""
    flags = QuantizationFlags.parse(args.quantization, args.bnb_4bit_quant_type, args.bnb_4bit_compute_dtype)
    if flags is None and not args.batch_invariant:
        return  # the model loads in Triton, which reports its problems itself
    plan = plan_for_checkpoint(Checkpoint.open(args.model), flags, select_device(args.device))
    if plan is not None and args.batch_invariant:
        raise ValueError(f"--batch-invariant: {BATCH_INVARIANT_QUANTIZED}")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    engine.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    engine.add_argument(
        "--quantization", "-q", choices=METHODS, default=None,
        help="bitsandbytes at load: bitsandbytes (4-bit NF4, as vLLM), bitsandbytes-8bit (LLM.int8), "
        "bitsandbytes-4bit; a checkpoint quantized with bitsandbytes needs none",
    )  # fmt: skip
    engine.add_argument("--bnb-4bit-quant-type", choices=QUANT_TYPES, default=None, help="4-bit: nf4 (default) or fp4")
    engine.add_argument(
        "--bnb-4bit-compute-dtype", choices=tuple(COMPUTE_DTYPES), default="auto",
        help="4-bit matrix products (auto: the model's dtype)",
    )  # fmt: skip
    engine.add_argument("--max-num-seqs", type=int, default=16, help="requests denoised together")
    engine.add_argument("--max-queue-size", "--max-num-queued-reqs", dest="max_queue_size", type=int, default=32,
                        help="waiting requests beyond which a request is refused (503, UNAVAILABLE)")  # fmt: skip
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--torch-num-threads", type=int, default=0, help="0: one per core")
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument(
        "--verifier", default="", help="APD's autoregressive verifier: a causal LM with the model's tokenizer"
    )
    engine.add_argument(
        "--batch-invariant",
        action="store_true",
        help="a request's tokens never depend on the requests beside it (as vLLM's VLLM_BATCH_INVARIANT=1)",
    )


def add_triton_arguments(parser: argparse.ArgumentParser, host_flag: str) -> None:
    """Triton's addresses and lifetime; `host_flag` names the bind address (`--host` when Triton serves alone)."""
    triton = parser.add_argument_group("triton")
    triton.add_argument(host_flag, dest="triton_host", default="127.0.0.1", help="address Triton binds")
    triton.add_argument("--triton-http-port", type=int, default=8100)
    triton.add_argument("--triton-grpc-port", type=int, default=8101)
    triton.add_argument("--triton-metrics-port", type=int, default=8102)
    triton.add_argument("--shutdown-timeout", "--exit-timeout", dest="exit_timeout", type=int, default=30,
                        help="seconds requests in flight get to finish on SIGTERM")  # fmt: skip
    triton.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    triton.add_argument("--workdir", type=Path, default=None, help="where the repository is rendered (temporary)")


def triton_address(args: argparse.Namespace) -> ServerAddress:
    return ServerAddress(args.triton_host, args.triton_http_port, args.triton_grpc_port, args.triton_metrics_port)


def triton_port_flags(address: ServerAddress) -> list[str]:
    """The flags that put `vdiff`'s tritonserver on `address`'s ports (what `triton_address` reads)."""
    ports = (address.http_port, address.grpc_port, address.metrics_port)
    return [part for kind, port in zip(("http", "grpc", "metrics"), ports, strict=True)
            for part in (f"--triton-{kind}-port", str(port))]  # fmt: skip


def serve_openai(args: argparse.Namespace) -> int:
    """Triton with the repository for the model, and the OpenAI server in front of it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.model = args.model_tag or args.model
    try:
        installation = find_tritonserver()
        model_dir = str(resolve_model_dir(args.model))
        check_quantization(args)
    except (TritonNotFoundError, ValueError) as error:
        print(f"vdiff: {error}", file=sys.stderr)
        return 2
    address = triton_address(args)
    try:
        app = build_proxy(args, model_dir, address.grpc_target, address.metrics_url)
    except (ValueError, OSError) as error:
        print(f"vdiff: {error}", file=sys.stderr)
        return 2
    server = make_server(app, args)
    with _workdir(args.workdir) as workdir:
        config = _launch_config(args, workdir, address)
        print(f"vdiff: model {args.model}, OpenAI server on port {args.port}", file=sys.stderr)
        return run_stack(TritonProcess(installation, config, echo=sys.stderr), server, _public_url(args))


def _public_url(args: argparse.Namespace) -> str:
    scheme = "https" if args.ssl_certfile else "http"
    host = args.host if args.host not in (None, "", "0.0.0.0", "::") else "127.0.0.1"
    return f"{scheme}://{host}:{args.port}{args.root_path}"


def serve_triton(args: argparse.Namespace) -> int:
    """Triton alone, serving the repository on its HTTP/gRPC ports."""
    try:
        installation = find_tritonserver()
        check_quantization(args)
    except (TritonNotFoundError, ValueError) as error:
        print(f"vdiff triton: {error}", file=sys.stderr)
        return 2
    with _workdir(args.workdir) as workdir:
        config = _launch_config(args, workdir, triton_address(args))
        print(f"vdiff triton: model {args.model}, repository {config.repository}", file=sys.stderr)
        return supervise(TritonProcess(installation, config, echo=sys.stderr))


@contextlib.contextmanager
def _workdir(chosen: Path | None) -> Iterator[Path]:
    """The given work directory, or a temporary one removed afterwards."""
    workdir = chosen or Path(tempfile.mkdtemp(prefix="vdiff-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield workdir
    finally:
        if chosen is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _launch_config(args: argparse.Namespace, workdir: Path, address: ServerAddress) -> LaunchConfig:
    return LaunchConfig(
        repository=render_repository(workdir / "model_repository", model_parameters(args)),
        workdir=workdir,
        address=address,
        exit_timeout_s=args.exit_timeout,
        startup_timeout_s=args.startup_timeout,
        extra_args=tuple(args.triton_args),
    )


def triton_env(args: argparse.Namespace) -> int:
    """Shell lines that run the committed repository on this machine's tritonserver."""
    try:
        installation = find_tritonserver()
    except TritonNotFoundError as error:
        print(f"vdiff triton-env: {error}", file=sys.stderr)
        return 2
    backends = installation.backend_directory(args.dir.resolve())
    env = server_environment(installation)
    print(f"export LD_LIBRARY_PATH={shlex.quote(env['LD_LIBRARY_PATH'])}")
    print(f"export PATH={shlex.quote(env['PATH'])}")
    print(f"# {installation.binary} --model-repository model_repository --backend-directory {backends}")
    return 0


def openai_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdiff",
        description="Serve a masked-diffusion LM with an OpenAI-compatible API (the flags of `vllm serve`). "
        "Other commands: `vdiff triton` (Triton alone), `vdiff triton-env DIR`.",
        epilog="Arguments after -- go to tritonserver unchanged.",
    )
    add_model_arguments(parser, default_model=DEFAULT_MODEL)
    add_engine_arguments(parser)
    add_triton_arguments(parser, "--triton-host")
    add_frontend_arguments(parser)
    add_ignored_arguments(parser, implemented=("--quantization",))
    return parser


def triton_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdiff triton", description="Run the Triton model repository for a model.")
    add_serve_arguments(parser)
    return parser


def triton_env_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdiff triton-env",
        description="print a bare tritonserver's setup",
    )
    parser.add_argument(
        "dir",
        type=Path,
        help="where to assemble backends/ (the Python backend and its stub)",
    )
    return parser


def build_parser(command: str = "serve") -> argparse.ArgumentParser:
    """A `vdiff` command's parser (`serve`, `triton`, `triton-env`); parsing starts nothing."""
    if command == "triton-env":
        return triton_env_parser()
    if command == "triton":
        return triton_parser()
    return openai_parser()


def split_command(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """`vdiff`'s arguments as (command, the command's own arguments, tritonserver's after `--`)."""
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "serve"
    if command == "triton-env" or "--" not in argv:
        return command, argv, []
    return command, argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def main(argv: list[str] | None = None) -> int:
    command, ours, triton_args = split_command(sys.argv[1:] if argv is None else argv)
    args = build_parser(command).parse_args(ours)
    if command == "triton-env":
        return triton_env(args)
    args.triton_args = triton_args
    if command == "triton":
        return serve_triton(args)
    return serve_openai(args)


if __name__ == "__main__":
    sys.exit(main())
