"""``servekit client URL``: an interactive terminal chat with a served model.

Replies stream as they are generated; the whole conversation is sent each turn. ``/reset`` clears the
history, ``/exit`` (or Ctrl-D) quits, Ctrl-C interrupts a reply.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any, TextIO

from servekit.client import APIClient, APIConnectionError, APIError

PROMPT = ">>> "
HELP = "Type a message and press Enter. /reset clears the conversation, /exit or Ctrl-D quits.\n"


class TerminalChat:
    def __init__(
        self,
        client: APIClient,
        model: str,
        *,
        system: str | None = None,
        output: TextIO = sys.stdout,
        read_line: Callable[[str], str] = input,
        request_options: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.output = output
        self.read_line = read_line
        self.request_options = request_options or {}
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> int:
        self._write(f"Chatting with {self.model} at {self.client.api_url}. {HELP}")
        while True:
            try:
                line = self.read_line(PROMPT)
            except EOFError:
                self._write("\n")
                return 0
            except KeyboardInterrupt:
                self._write("\n")
                continue
            command = line.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                self.reset()
                self._write("(conversation cleared)\n")
                continue
            if command == "/help":
                self._write(HELP)
                continue
            status = self.turn(line)
            if status is not None:
                return status

    def turn(self, text: str) -> int | None:
        """Send one user message and stream the reply; a lost server ends the chat (returns 1)."""
        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            chunks = self.client.chat_completions_v1(
                self.model, self.messages, stream=True, **self.request_options
            )
            for chunk in chunks:
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        reply.append(delta)
                        self._write(delta)
        except KeyboardInterrupt:
            self._write(" [interrupted]")
        except APIConnectionError as error:
            self.messages.pop()
            self._write(f"\nerror: {error}\n")
            return 1
        except APIError as error:
            self.messages.pop()
            self._write(f"\nerror: {error}\n")
            return None
        self._write("\n")
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        return None

    def _write(self, text: str) -> None:
        self.output.write(text)
        self.output.flush()


def run_chat(
    url: str,
    *,
    api_key: str | None = None,
    model: str | None = None,
    system: str | None = None,
    output: TextIO = sys.stdout,
    read_line: Callable[[str], str] = input,
) -> int:
    """Run the chat until the user quits; returns the process exit status."""
    client = APIClient(url, api_key=api_key)
    if model is None:
        try:
            models = client.available_models
        except APIError as error:
            output.write(f"error: {error}\n")
            return 1
        if not models:
            output.write(f"error: the server at {client.api_url} serves no models\n")
            return 1
        model = models[0]
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    return TerminalChat(client, model, system=system, output=output, read_line=read_line).run()
