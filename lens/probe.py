"""Probes as data: facts, probe files (JSON or YAML), validation and the built-ins.

A probe file is an object with a non-empty list ``facts``; each fact has an
``id``, a ``prompt`` and an ``answer``, and optionally a ``no_filler`` prompt
(the stylistic ablation), a ``control`` (``{prompt, answer}``, the negative
control), ``important_words`` (positions whose token contains one get the long
top-k) and ``test_prompts`` (extra prompts whose head top-k goes into the JSON).
Top level may also carry ``name`` and ``description``.

Validation is strict: a missing field, a wrong type, an empty string, a
duplicate id or an unknown key is an error (an unknown key is most often a
typo such as ``no_filer``, which would otherwise silently drop the ablation).
Every error is one line naming the file, the fact (index and id) and the field.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lens.errors import LensError

BUILTIN_DIR = "probes"
PROBE_SUFFIXES = (".json", ".yaml", ".yml")
FACT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Fact ids name files and CSV rows: letters, digits, ``_ . -``; at most 64 characters."""
TOP_KEYS = ("name", "description", "facts")
FACT_KEYS = ("id", "prompt", "answer", "no_filler", "control", "important_words", "test_prompts")
CONTROL_KEYS = ("prompt", "answer")


@dataclass(frozen=True, kw_only=True)
class Control:
    prompt: str
    answer: str


@dataclass(frozen=True, kw_only=True)
class Fact:
    """One fact of a probe: a prompt, its gold answer, an ablation and a control."""

    id: str
    prompt: str
    answer: str
    no_filler: str | None = None
    control: Control | None = None
    important_words: tuple[str, ...] = ()
    test_prompts: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Probe:
    name: str
    facts: tuple[Fact, ...] = field(default_factory=tuple)
    description: str = ""

    @property
    def is_multi(self) -> bool:
        """More than one fact: outputs carry a ``fact_id`` column and an aggregate."""
        return len(self.facts) > 1


def _unknown(keys: object, allowed: tuple[str, ...], where: str) -> None:
    for key in keys:  # type: ignore[attr-defined]
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LensError(f"{where}: unknown field {key!r}{hint}; "
                            f"allowed: {', '.join(allowed)}")


def _text(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise LensError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise LensError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise LensError(f"{where}: field {key!r} must not be empty")
    if key in ("prompt", "no_filler") and value != value.rstrip():
        raise LensError(f"{where}: field {key!r} ends with whitespace; write the prompt without "
                        "it (the answer alignment tries ' answer' and 'answer' itself)")
    return value


def _texts(obj: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if value is None:
        return ()
    if not isinstance(value, list):
        raise LensError(f"{where}: field {key!r} must be a list of strings, "
                        f"got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise LensError(f"{where}: field {key!r} item {i} must be a non-empty string")
    return tuple(value)


def _fact(raw: object, index: int, source: str) -> Fact:
    fid = raw.get("id") if isinstance(raw, dict) else None
    where = f"{source}: fact {index}" + (f" ({fid})" if isinstance(fid, str) and fid else "")
    if not isinstance(raw, dict):
        raise LensError(f"{where}: must be an object with id, prompt and answer, "
                        f"got {type(raw).__name__}")
    _unknown(raw, FACT_KEYS, where)
    fact_id = str(_text(raw, "id", where))
    if not FACT_ID.fullmatch(fact_id):
        raise LensError(f"{where}: field 'id' must be 1-64 letters, digits, '_', '.' or '-' "
                        "starting with a letter or digit (it names files and CSV rows)")
    control = raw.get("control")
    if control is not None:
        if not isinstance(control, dict):
            raise LensError(f"{where}: field 'control' must be an object with prompt and answer, "
                            f"got {type(control).__name__}")
        _unknown(control, CONTROL_KEYS, f"{where}: control")
        control = Control(prompt=str(_text(control, "prompt", f"{where}: control")),
                          answer=str(_text(control, "answer", f"{where}: control")))
    return Fact(
        id=fact_id,
        prompt=str(_text(raw, "prompt", where)),
        answer=str(_text(raw, "answer", where)),
        no_filler=_text(raw, "no_filler", where, optional=True),
        control=control,
        important_words=_texts(raw, "important_words", where),
        test_prompts=_texts(raw, "test_prompts", where),
    )


def parse_probe(raw: object, source: str) -> Probe:
    """Validate a decoded probe document; errors name the source, the fact and the field."""
    if not isinstance(raw, dict):
        raise LensError(f"{source}: a probe file holds an object with a list 'facts', "
                        f"got {type(raw).__name__}")
    _unknown(raw, TOP_KEYS, source)
    facts_raw = raw.get("facts")
    if not isinstance(facts_raw, list) or not facts_raw:
        raise LensError(f"{source}: a probe needs a non-empty list 'facts'")
    facts = tuple(_fact(f, i, source) for i, f in enumerate(facts_raw))
    seen: dict[str, int] = {}
    for i, f in enumerate(facts):
        if f.id in seen:
            raise LensError(f"{source}: fact {i} ({f.id}): duplicate id, "
                            f"already used by fact {seen[f.id]}")
        seen[f.id] = i
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        raise LensError(f"{source}: field 'name' must be a non-empty string")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise LensError(f"{source}: field 'description' must be a string")
    return Probe(name=name, facts=facts, description=description)


def _decode(text: str, source: str, suffix: str) -> object:
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise LensError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno}") from exc
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise LensError(f"{source}: not valid YAML: {problem}{at}") from exc


def load_probe(path: str | Path) -> Probe:
    """Read and validate a probe file (``.json``, ``.yaml`` or ``.yml``)."""
    path = Path(path)
    if path.suffix.lower() not in PROBE_SUFFIXES:
        raise LensError(f"probe file {path} must end in .json, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LensError(f"probe file {path} does not exist; give a probe file or a built-in "
                        f"name ({', '.join(builtin_probes())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LensError(f"cannot read probe file {path}: {exc}") from exc
    return parse_probe(_decode(text, str(path), path.suffix.lower()), str(path))


def builtin_probes() -> tuple[str, ...]:
    """Names of the probes shipped in ``lens/probes/``."""
    folder = resources.files("lens").joinpath(BUILTIN_DIR)
    return tuple(sorted(p.name.removesuffix(".json") for p in folder.iterdir()
                        if p.name.endswith(".json")))


def builtin_probe(name: str) -> Probe:
    """A probe shipped with lens (``default``, ``capitals``)."""
    if name not in builtin_probes():
        raise LensError(f"no built-in probe {name!r}; built-ins: {', '.join(builtin_probes())}")
    text = resources.files("lens").joinpath(f"{BUILTIN_DIR}/{name}.json").read_text(encoding="utf-8")
    return parse_probe(json.loads(text), f"{name}.json")


def resolve_probe(spec: str) -> Probe:
    """``--probe``: a built-in name, else a path to a probe file."""
    if spec in builtin_probes():
        return builtin_probe(spec)
    if Path(spec).suffix.lower() in PROBE_SUFFIXES or Path(spec).exists():
        return load_probe(spec)
    raise LensError(f"--probe {spec}: neither a built-in probe ({', '.join(builtin_probes())}) "
                    "nor a .json/.yaml probe file")


def default_probe() -> Probe:
    """The built-in baseline probe (Germany → Berlin), shipped as ``lens/probes/default.json``."""
    return builtin_probe("default")
