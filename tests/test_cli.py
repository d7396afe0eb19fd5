"""The flags of ``python -m lens.run`` come from ``RunConfig``: one spelling of the config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_args

import pytest

from lens.cli import config_from, flag_fields
from lens.config import RunConfig, choices, cli_flag
from lens.run import build_parser
from lens.testing import REPO

FLAG_FIELDS = [f.name for f in flag_fields()]


def _other_value(name: str):
    """A valid value for field ``name`` that differs from its default where the type allows."""
    f = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
    annotation, default = RunConfig.field_type(name), f.default
    plain = next((a for a in get_args(annotation) if a is not type(None)), annotation)
    if allowed := choices(annotation):
        return next(c for c in allowed if c != default)
    if plain is bool:
        return not default
    if plain is float:
        return default / 2
    if plain is int:
        return (default or 1) + 1
    if plain is Path:
        return Path("some/dir")
    if plain is str:
        return "balanced"
    return default


def _argv(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [cli_flag(name)] if value else [f"--no-{name.replace('_', '-')}"]
    return [cli_flag(name), ",".join(value) if isinstance(value, tuple) else str(value)]


def test_every_field_is_a_flag_or_says_why_not():
    for f in dataclasses.fields(RunConfig):
        if f.name in FLAG_FIELDS:
            assert f.metadata.get("help"), f"RunConfig.{f.name} has no help text (use option())"
        else:
            assert f.metadata.get("why"), f"RunConfig.{f.name} is no flag and says not why"


def test_parsing_nothing_gives_the_defaults():
    assert config_from(build_parser().parse_args([])) == RunConfig()


@pytest.mark.parametrize("name", FLAG_FIELDS)
def test_each_flag_sets_its_field(name):
    value = _other_value(name)
    args = build_parser().parse_args(["m", *_argv(name, value)])
    assert config_from(args) == dataclasses.replace(RunConfig(), **{name: value})


def test_help_shows_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in flag_fields():
        assert cli_flag(f.name) in text
        if allowed := choices(RunConfig.field_type(f.name)):
            assert "{" + ",".join(allowed) + "}" in text
        if f.default is not None and not isinstance(f.default, bool | tuple):
            assert f"{cli_flag(f.name)} " in text and f"(default {f.default})" in text


def test_readme_documents_every_flag():
    table = (REPO / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(--[a-z0-9_-]+)", table))
    run_flags = {o for a in build_parser()._actions for o in a.option_strings
                 if o.startswith("--") and o != "--help"}
    assert run_flags - documented == set()


def test_a_bad_choice_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--raw-lens", "some"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "--raw-lens" in err
