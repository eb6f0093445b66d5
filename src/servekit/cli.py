"""The ``servekit`` command."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servekit", description="servekit: serve AI models over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    hello = commands.add_parser("hello", help='serve the hello-world example (POST /predict {"input": 4.0})')
    hello.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    hello.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve = commands.add_parser("serve", help="serve a model (until the LLM server lands: the hello-world example)")
    serve.add_argument("model", nargs="?", default=None, help="model to serve (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("hello", "serve"):
        import servekit as ls
        from servekit.examples import SimpleLitAPI

        ls.LitServer(SimpleLitAPI(), accelerator="cpu").run(
            host=args.host, port=args.port, generate_client_file=False
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
