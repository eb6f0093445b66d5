"""Render chat messages to a prompt with a model's jinja2 chat template, as transformers does.

Templates come from model repositories, so they are untrusted: they run in jinja2's immutable
sandbox. The environment mirrors transformers' (``trim_blocks``, ``lstrip_blocks``, loop controls,
a ``{% generation %}`` block, ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not
escape HTML), so prompts are byte-for-byte what ``apply_chat_template(tokenize=False)`` gives.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

# Marks where a continued final message ends, so the rendering can be cut there.
_CONTINUE_TAG = "\x00SERVEKIT_CONTINUE\x00"


class ChatTemplateError(ValueError):
    """The template cannot render these messages (it raised, or it is not valid jinja2)."""


def resolve_chat_template(value: str) -> str:
    """``value`` is a path to a template file (.jinja/.j2/.txt, or a JSON file with a
    ``chat_template`` key) or the template source itself."""
    looks_like_path = "\n" not in value and "{" not in value and len(value) < 4096
    if looks_like_path:
        path = Path(value).expanduser()
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                data = json.loads(text)
                template = data.get("chat_template") if isinstance(data, Mapping) else None
                if not isinstance(template, str):
                    raise ChatTemplateError(f"{path} has no string 'chat_template' key")
                return template
            return text
        if path.suffix in (".jinja", ".j2", ".json") or "/" in value:
            raise ChatTemplateError(f"chat template file {value!r} does not exist")
    return value


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; when
    rendering a prompt it is a plain block."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: jinja2.runtime.Macro) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _SafeNamespace
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"invalid chat template (line {error.lineno}): {error.message}") from error


def _plain(value: Any) -> Any:
    """A copy made only of JSON types, so the sandboxed template sees no foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(source)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """The prompt text. ``extra`` reaches the template as variables (e.g. ``documents``,
        ``enable_thinking``). ``continue_final_message`` renders the last (assistant) message open,
        so generation continues it; it excludes ``add_generation_prompt``."""
        chat = _plain(messages)
        if not isinstance(chat, list) or not all(isinstance(m, dict) for m in chat):
            raise ChatTemplateError("messages must be a list of objects")
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ChatTemplateError("continue_final_message needs a final message with string content")
            add_generation_prompt = False
            chat[-1]["content"] += _CONTINUE_TAG
        variables: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "documents": None,
        }
        variables.update(_plain(extra))
        variables.update(
            messages=chat,
            tools=_plain(tools),
            add_generation_prompt=add_generation_prompt,
        )
        try:
            rendered = self._template.render(**variables)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(str(error) or type(error).__name__) from error
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as error:
            raise ChatTemplateError(f"chat template failed: {type(error).__name__}: {error}") from error
        if continue_final_message:
            position = rendered.rfind(_CONTINUE_TAG)
            if position < 0:
                raise ChatTemplateError("the chat template does not render the final message's content")
            rendered = rendered[:position]
        return rendered
