"""The `vdiff` command. `vdiff serve`: the Triton half of the one-command server.

vdiff serve [--model PATH|NAME] [--triton-http-port 8100] [--triton-grpc-port 8101] [-- TRITON ARGS]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from vdiff.assets import DEFAULT_MODEL
from vdiff.serve.launcher import LaunchConfig, ServerAddress, TritonProcess, supervise
from vdiff.serve.repository import render_repository
from vdiff.serve.tritonserver import TritonNotFoundError, find_tritonserver, server_environment


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model directory, Hub id or shipped name ({DEFAULT_MODEL})"
    )
    model.add_argument("--tokenizer", default="", help="separate tokenizer directory or Hub id")
    model.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    model.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    model.add_argument("--trust-remote-code", action="store_true")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=16, help="requests denoised together")
    engine.add_argument("--max-queue-size", type=int, default=32, help="waiting requests before UNAVAILABLE")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--torch-num-threads", type=int, default=0, help="0: one per core")
    engine.add_argument("--seed", type=int, default=0)
    triton = parser.add_argument_group("triton")
    triton.add_argument("--host", default="127.0.0.1", help="address Triton binds (0.0.0.0 for every interface)")
    triton.add_argument("--triton-http-port", type=int, default=8100)
    triton.add_argument("--triton-grpc-port", type=int, default=8101)
    triton.add_argument("--triton-metrics-port", type=int, default=8102)
    triton.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain requests on shutdown")
    triton.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    triton.add_argument("--workdir", type=Path, default=None, help="where the repository is rendered (temporary)")
    triton.add_argument("triton_args", nargs="*", help="arguments after -- go to tritonserver unchanged")


def model_parameters(args: argparse.Namespace) -> dict[str, str]:
    """The config.pbtxt parameters for these arguments."""
    return {
        "model": args.model,
        "tokenizer": args.tokenizer,
        "dtype": args.dtype,
        "device": args.device,
        "trust_remote_code": str(args.trust_remote_code).lower(),
        "max_num_seqs": str(args.max_num_seqs),
        "max_queue_size": str(args.max_queue_size),
        "max_num_batched_tokens": "" if args.max_num_batched_tokens is None else str(args.max_num_batched_tokens),
        "torch_num_threads": str(args.torch_num_threads),
        "seed": str(args.seed),
        "shutdown_timeout_s": str(args.exit_timeout),
    }


def serve(args: argparse.Namespace) -> int:
    try:
        installation = find_tritonserver()
    except TritonNotFoundError as error:
        print(f"vdiff serve: {error}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vdiff-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        config = LaunchConfig(
            repository=render_repository(workdir / "model_repository", model_parameters(args)),
            workdir=workdir,
            address=ServerAddress(args.host, args.triton_http_port, args.triton_grpc_port, args.triton_metrics_port),
            exit_timeout_s=args.exit_timeout,
            startup_timeout_s=args.startup_timeout,
            extra_args=tuple(args.triton_args),
        )
        print(f"vdiff serve: model {args.model}, repository {config.repository}", file=sys.stderr)
        return supervise(TritonProcess(installation, config, echo=sys.stderr))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdiff", description="Serve masked-diffusion language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the Triton model repository for a model")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(run=serve)
    env_parser = commands.add_parser("triton-env", help="prepare a backend directory; print the environment")
    env_parser.add_argument("dir", type=Path, help="where to assemble backends/ (the Python backend and its stub)")
    env_parser.set_defaults(run=triton_env)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
