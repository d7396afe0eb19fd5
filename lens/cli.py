"""Shared command-line plumbing: the one-line parser and the flags of ``RunConfig``.

``RunConfig`` is the single spelling of the run configuration: its fields'
types, defaults and ``option`` metadata become flags here, so a new field is a
new flag without touching any parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Collection
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from lens.config import RunConfig, choices, cli_flag


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (and exits 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag_fields(config_type: type[RunConfig] = RunConfig) -> tuple[dataclasses.Field, ...]:
    """The fields of ``config_type`` that are flags (all but those declared ``fixed``)."""
    return tuple(f for f in dataclasses.fields(config_type) if f.metadata.get("cli", True))


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _without_none(annotation: Any) -> Any:
    """``X | None`` → ``X`` (the optional fields take ``X`` on the command line)."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _flag_kwargs(config_type: type[RunConfig], f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords for field ``f``: action/type/choices from its annotation."""
    annotation = _without_none(config_type.field_type(f.name))
    default = _default(f)
    help_text = f.metadata.get("help") or f"RunConfig.{f.name}"
    kwargs: dict[str, Any] = {"dest": f.name, "default": default}
    if annotation is bool:
        kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif allowed := choices(annotation):
        kwargs["choices"] = allowed
    elif annotation in (int, float, str, Path):
        kwargs["type"] = annotation
    elif get_origin(annotation) is tuple and get_args(annotation) == (str, ...):
        kwargs["type"] = _comma_list
        kwargs.setdefault("metavar", "A,B,…")
    else:
        raise TypeError(f"RunConfig.{f.name}: no command-line form for {annotation!r}; "
                        "use bool, int, float, str, Path, Literal[...] or tuple[str, ...]")
    if f.metadata.get("metavar"):
        kwargs["metavar"] = f.metadata["metavar"]
    if annotation is not bool and default is not None:
        help_text += f" (default {_shown(default)})"
    kwargs["help"] = help_text
    return kwargs


def add_config_flags(parser: argparse.ArgumentParser, config_type: type[RunConfig] = RunConfig,
                     *, only: Collection[str] | None = None) -> None:
    """Add one flag per ``RunConfig`` field (``--copy-threshold`` for ``copy_threshold``).

    ``only`` limits them to some fields, for tools that share a few settings
    with ``lens.run`` (``lens.prism_fit``: ``device``, ``dtype``).
    """
    group = parser.add_argument_group("run configuration")
    for f in flag_fields(config_type):
        if only is None or f.name in only:
            group.add_argument(cli_flag(f.name), **_flag_kwargs(config_type, f))


def config_from(args: argparse.Namespace, config_type: type[RunConfig] = RunConfig) -> RunConfig:
    """The ``RunConfig`` the parsed flags describe (validated by ``RunConfig`` itself)."""
    return config_type(**{f.name: getattr(args, f.name) for f in flag_fields(config_type)})
