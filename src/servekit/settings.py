"""Settings declared once, on dataclass fields (help text, env names), and the one parser of their text.

A field declared with ``setting(...)`` is read from, in this order: a command-line flag, ``SERVEKIT_<NAME>``,
the other env names it lists (the vLLM serverless worker's, such as ``MAX_MODEL_LEN``), else its default.
A dataclass may set a class attribute ``ENV_PREFIX`` to read ``<ENV_PREFIX><NAME>`` instead
(``servekit proxy``'s settings are ``SERVEKIT_PROXY_<NAME>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "SERVEKIT_"
_METADATA_KEY = "servekit.setting"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingError(ValueError):
    """An invalid setting; ``name`` is the field it concerns."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class SettingInfo:
    help: str
    env: tuple[str, ...] = ()  # env names read after SERVEKIT_<NAME>
    secret: bool = False  # redacted wherever the configuration is shown


def setting(default: Any, help: str, *, env: tuple[str, ...] = (), secret: bool = False) -> Any:
    """A dataclass field that is a setting: ``model: str | None = setting(None, "the model", env=(...))``."""
    return dataclasses.field(default=default, metadata={_METADATA_KEY: SettingInfo(help, env, secret)})


@dataclass(frozen=True)
class Setting:
    """One declared setting, with the types its annotation allows."""

    name: str
    types: tuple[type, ...]  # the annotation's types other than None
    optional: bool
    default: Any
    info: SettingInfo
    prefix: str = ENV_PREFIX

    @property
    def env_names(self) -> tuple[str, ...]:
        return (self.prefix + self.name.upper(), *self.info.env)

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    @property
    def is_bool(self) -> bool:
        return bool in self.types

    def parse(self, raw: str, origin: str) -> Any:
        """The typed value of ``raw`` (a flag's or env var's text); ``origin`` names it in errors."""
        text = raw.strip()
        lowered = text.lower()
        if self.optional and lowered in ("none", "null"):
            return None
        if self.is_bool:
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise SettingError(f"{origin} must be a boolean (true/false), got {raw!r}", self.name)
        for kind in (int, float):
            if kind in self.types:
                try:
                    return kind(text)
                except ValueError:
                    if str in self.types:
                        return raw
                    what = "an integer" if kind is int else "a number"
                    raise SettingError(f"{origin} must be {what}, got {raw!r}", self.name) from None
        return raw


def settings_of(cls: type) -> tuple[Setting, ...]:
    """The settings a dataclass declares, in declaration order."""
    hints = typing.get_type_hints(cls)
    prefix = getattr(cls, "ENV_PREFIX", ENV_PREFIX)
    declared = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get(_METADATA_KEY)
        if info is None:
            continue
        hint = hints[f.name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = tuple(o for o in options if o is not type(None))
        declared.append(Setting(f.name, kinds, len(kinds) < len(options), f.default, info, prefix))
    return tuple(declared)


def read_settings(
    cls: type, flags: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The values of ``cls``'s settings that a flag (not None) or an env name gives, and, for each, where it
    came from (``"flag"`` or ``"env NAME"``). Flag values that are text are parsed like env values."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in settings_of(cls):
        given = flags.get(s.name)
        if given is not None:
            values[s.name] = s.parse(given, s.flag) if isinstance(given, str) else given
            sources[s.name] = "flag"
            continue
        for name in s.env_names:
            raw = env.get(name)
            if raw is not None and raw.strip():
                values[s.name] = s.parse(raw, name)
                sources[s.name] = f"env {name}"
                break
    return values, sources


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def with_origin(error: SettingError, sources: Mapping[str, str]) -> SettingError:
    """``error`` (raised by a config built from ``read_settings`` values) naming the flag or env var
    its value came from; as it is for a default value."""
    where = sources.get(error.name)
    if where is None:
        return error
    origin = flag_of(error.name) if where == "flag" else where
    return type(error)(f"{error} (from {origin})", error.name)


def setting_values(config: object) -> dict[str, Any]:
    """A settings dataclass as a dict of its settings, secrets that are set replaced by ``***``."""
    data = {}
    for s in settings_of(type(config)):
        value = getattr(config, s.name)
        data[s.name] = "***" if s.info.secret and value else value
    return data


def one_of(choices: Sequence[str]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"``, for error messages."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else "".join(choices)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type,
    positional: str | None = None,
    repeated: tuple[str, ...] = (),
) -> None:
    """One flag per setting of ``config_class`` (``positional`` names the one that is an argument;
    ``repeated`` the flags that may be given several times). Every default is None so that env vars can
    fill what is not given; values are parsed later, by ``read_settings``."""
    for s in settings_of(config_class):
        default = "" if s.default is None else f"default: {s.default}; "
        help_text = f"{s.info.help} ({default}env: {', '.join(s.env_names)})"
        if s.name == positional:
            parser.add_argument(s.name, nargs="?", default=None, help=help_text)
        elif s.is_bool:
            parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif s.name in repeated:
            parser.add_argument(s.flag, action="append", default=None, help=help_text, metavar=s.name.upper())
        else:
            parser.add_argument(s.flag, default=None, help=help_text, metavar=s.name.upper())


def env_flag(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean env var (true/false, 1/0, yes/no, on/off), ``default`` when unset."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or not raw.strip():
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingError(f"{name} must be a boolean (true/false), got {raw!r}", name)
