"""The ``servekit`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from servekit.bench.command import add_bench_arguments
from servekit.proxy.command import add_proxy_arguments, run_proxy_command
from servekit.specs.llm.command import add_serve_arguments, resolve_serve_config
from servekit.threads import default_passive_wait

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servekit", description="servekit: serve AI models over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    hello = commands.add_parser("hello", help='serve the hello-world example (POST /predict {"input": 4.0})')
    hello.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    hello.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve = commands.add_parser(
        "serve",
        help="serve an LLM with an OpenAI-compatible API (default: SmolLM2-135M-Instruct)",
        description="Serve an LLM over HTTP: OpenAI chat/completions/models plus native endpoints. "
        "Every flag can also be set with the env var named in its help.",
    )
    add_serve_arguments(serve)
    proxy = commands.add_parser(
        "proxy",
        help="distribute requests over many servers (nodes) behind one OpenAI-compatible endpoint",
        description="One endpoint in front of many servekit serve nodes: OpenAI and native routes, "
        "LMDeploy's node registry (/nodes/...), routing strategies, health checks, retries. "
        "Every flag can also be set with the env var named in its help.",
    )
    add_proxy_arguments(proxy)
    bench = commands.add_parser(
        "bench",
        help="load an OpenAI-compatible server and report latency and throughput (as vllm bench serve)",
        description="Send streamed requests at a fixed concurrency or a Poisson rate; report TTFT, TPOT, "
        "ITL and end-to-end latency percentiles, request and token throughput, failures "
        "(--json for the full report, --plot for a PNG of the distributions).",
    )
    add_bench_arguments(bench)
    client = commands.add_parser(
        "client",
        help="chat with a served LLM in the terminal (streams replies, keeps the conversation)",
        description="Interactive terminal chat with an OpenAI-compatible server. "
        "/reset clears the conversation; /exit or Ctrl-D quits.",
    )
    client.add_argument("url", help="the server's address, e.g. http://127.0.0.1:8000")
    client.add_argument(
        "--api-key", default=None, help="API key sent as a Bearer token (env: SERVEKIT_API_KEY)"
    )
    client.add_argument("--model", default=None, help="model id (default: the server's first model)")
    client.add_argument("--system", default=None, help="system prompt that starts the conversation")
    commands.add_parser(
        "models",
        help="list the model architectures `servekit serve` runs",
        description="The architectures (HF model_type) servekit's LLM engine implements, and which load from GGUF.",
    )
    dockerize = commands.add_parser(
        "dockerize",
        help="write a Dockerfile (and requirements.txt) for a server script",
        description="Write a Dockerfile beside SERVER_FILE (the build context is its directory), plus "
        "requirements.txt (from the script's imports) and .dockerignore when they are absent.",
    )
    dockerize.add_argument("server_file", help="the server script, e.g. server.py")
    dockerize.add_argument(
        "--port", type=int, default=8000, help="the port the server listens on (default: 8000)"
    )
    dockerize.add_argument("--gpu", action="store_true", help="build on a CUDA runtime image")
    dockerize.add_argument("--force", action="store_true", help="overwrite an existing Dockerfile")
    return parser


def run_dockerize(args: argparse.Namespace) -> int:
    from servekit.dockerize import dockerize, image_name

    try:
        result = dockerize(args.server_file, port=args.port, gpu=args.gpu, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"servekit dockerize: {error}", file=sys.stderr)
        return 2
    for path in result.written:
        print(f"wrote {path}")
    for path in result.kept:
        print(f"kept  {path}")
    context = result.written[0].parent
    image = image_name(args.server_file)
    print(f"\nBuild:  docker build -t {image} {context}\nRun:    {result.run_command}")
    return 0


def run_models() -> int:
    from servekit.llm.models.registry import architectures_table

    print(architectures_table())
    return 0


def run_client(args: argparse.Namespace) -> int:
    import os

    from servekit.chat_cli import run_chat

    api_key = args.api_key or os.environ.get("SERVEKIT_API_KEY")
    return run_chat(args.url, api_key=api_key, model=args.model, system=args.system)


def main(argv: list[str] | None = None) -> int:
    # Before anything imports torch (here or in the worker processes, which inherit it): idle OpenMP
    # threads sleep instead of spinning, so neighbours on the cores do not make steps collapse.
    default_passive_wait()
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        config = resolve_serve_config(args)
        if config is None:
            return 2
        from servekit.proxy.scaleout import serve_scaled

        serve_scaled(config, vars(args))
        return 0
    if args.command == "proxy":
        return run_proxy_command(args)
    if args.command == "bench":
        from servekit.bench.command import run_bench_command

        return run_bench_command(args)
    if args.command == "client":
        return run_client(args)
    if args.command == "dockerize":
        return run_dockerize(args)
    if args.command == "models":
        return run_models()
    if args.command == "hello":
        import servekit as ls
        from servekit.examples import SimpleLitAPI

        ls.LitServer(SimpleLitAPI(), accelerator="cpu").run(
            host=args.host, port=args.port, generate_client_file=False
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
