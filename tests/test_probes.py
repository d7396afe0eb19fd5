"""Probe files: loading, validation errors, built-ins, --probe, and multi-fact outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lens.errors import LensError
from lens.probe import (
    builtin_probe,
    builtin_probes,
    default_probe,
    load_probe,
    parse_probe,
    resolve_probe,
)
from lens.run import main

TESTS = Path(__file__).resolve().parent

GOOD = {
    "name": "two",
    "facts": [
        {"id": "de", "prompt": "The capital of Germany is called", "answer": "Berlin",
         "no_filler": "The capital of Germany is", "important_words": ["Germany"],
         "control": {"prompt": "The capital of France is called", "answer": "Paris"}},
        {"id": "fr", "prompt": "The capital of France is called", "answer": "Paris"},
    ],
}


def _write(tmp_path: Path, doc: object, suffix: str = ".json") -> Path:
    path = tmp_path / f"probe{suffix}"
    text = json.dumps(doc) if suffix == ".json" else yaml.safe_dump(doc, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path


def _bad(mutate):  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(GOOD)
    mutate(doc)
    return doc


# --- built-ins -------------------------------------------------------------------


def test_builtins_are_listed_and_valid():
    assert {"default", "capitals"} <= set(builtin_probes())
    for name in builtin_probes():
        assert builtin_probe(name).name == name


def test_default_probe_is_the_spec_probe():
    (fact,) = default_probe().facts
    assert fact.prompt == ("Give the city name only, plain text. "
                           "The capital of Germany is called simply")
    assert fact.answer == "Berlin" and fact.no_filler and fact.control
    assert fact.control.answer == "Paris"
    assert len(fact.test_prompts) == 14
    assert set(fact.important_words) == {"Germany", "Berlin", "capital", "Answer", "word", "simply"}


def test_capitals_probe_has_twenty_complete_facts():
    probe = builtin_probe("capitals")
    assert len(probe.facts) >= 20 and probe.is_multi
    answers = {f.answer for f in probe.facts}
    for fact in probe.facts:
        assert fact.no_filler and fact.prompt.startswith(fact.no_filler)
        assert fact.control is not None and fact.control.answer != fact.answer
        assert fact.control.answer in answers  # the control is another country of the probe
        assert fact.answer in fact.important_words


# --- loading -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_json_and_yaml_load_the_same_probe(tmp_path, suffix):
    probe = load_probe(_write(tmp_path, GOOD, suffix))
    assert probe == parse_probe(GOOD, "x.json")
    assert [f.id for f in probe.facts] == ["de", "fr"]
    assert probe.facts[0].control.prompt == "The capital of France is called"
    assert probe.facts[1].no_filler is None and probe.facts[1].control is None


def test_resolve_probe_takes_names_and_paths(tmp_path):
    assert resolve_probe("capitals") == builtin_probe("capitals")
    assert resolve_probe(str(_write(tmp_path, GOOD))).name == "two"
    with pytest.raises(LensError, match="neither a built-in probe"):
        resolve_probe("no-such-probe")


text_st = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(
    lambda s: s.strip() and s == s.rstrip())


@given(st.lists(st.tuples(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,10}", fullmatch=True),
                          text_st, text_st), min_size=1, max_size=5, unique_by=lambda t: t[0]))
def test_any_valid_probe_round_trips_through_json_and_yaml(facts):
    doc = {"facts": [{"id": i, "prompt": p, "answer": a} for i, p, a in facts]}
    from_json = parse_probe(json.loads(json.dumps(doc)), "p.json")
    from_yaml = parse_probe(yaml.safe_load(yaml.safe_dump(doc, allow_unicode=True)), "p.json")
    assert from_json == from_yaml
    assert [(f.id, f.prompt, f.answer) for f in from_json.facts] == facts


# --- validation: one line naming file, fact and field ---------------------------------

BAD = {
    "missing-answer": (lambda d: d["facts"][1].pop("answer"), "fact 1 (fr): missing field 'answer'"),
    "missing-id": (lambda d: d["facts"][0].pop("id"), "fact 0: missing field 'id'"),
    "prompt-not-string": (lambda d: d["facts"][0].update(prompt=3),
                          "fact 0 (de): field 'prompt' must be a string, got int"),
    "empty-answer": (lambda d: d["facts"][1].update(answer="  "),
                     "fact 1 (fr): field 'answer' must not be empty"),
    "empty-no-filler": (lambda d: d["facts"][0].update(no_filler=""),
                        "fact 0 (de): field 'no_filler' must not be empty"),
    "trailing-space": (lambda d: d["facts"][1].update(prompt="The capital is "),
                       "fact 1 (fr): field 'prompt' ends with whitespace"),
    "duplicate-id": (lambda d: d["facts"][1].update(id="de"),
                     "fact 1 (de): duplicate id, already used by fact 0"),
    "unknown-key": (lambda d: d["facts"][0].update(no_filer="x"),
                    "fact 0 (de): unknown field 'no_filer' (did you mean 'no_filler'?)"),
    "unknown-top-key": (lambda d: d.update(fact=[]), "unknown field 'fact' (did you mean 'facts'?)"),
    "bad-id": (lambda d: d["facts"][1].update(id="a b"), "fact 1 (a b): field 'id' must be"),
    "control-not-object": (lambda d: d["facts"][0].update(control="France"),
                           "fact 0 (de): field 'control' must be an object"),
    "control-missing-answer": (lambda d: d["facts"][0]["control"].pop("answer"),
                               "fact 0 (de): control: missing field 'answer'"),
    "control-unknown-key": (lambda d: d["facts"][0]["control"].update(answr="x"),
                            "fact 0 (de): control: unknown field 'answr'"),
    "words-not-list": (lambda d: d["facts"][0].update(important_words="Germany"),
                       "fact 0 (de): field 'important_words' must be a list of strings, got str"),
    "words-item": (lambda d: d["facts"][0].update(important_words=["Germany", 4]),
                   "fact 0 (de): field 'important_words' item 1 must be a non-empty string"),
    "fact-not-object": (lambda d: d["facts"].append("x"), "fact 2: must be an object"),
    "no-facts": (lambda d: d.update(facts=[]), "a probe needs a non-empty list 'facts'"),
    "name-not-string": (lambda d: d.update(name=5), "field 'name' must be a non-empty string"),
}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_probe_gives_one_line_naming_file_fact_field(tmp_path, case, suffix):
    mutate, expected = BAD[case]
    path = _write(tmp_path, _bad(mutate), suffix)
    with pytest.raises(LensError) as info:
        load_probe(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("p.json", '{"facts": [', "not valid JSON: Expecting value at line 1, column 12"),
    ("p.yaml", "facts: [a, b\n", "not valid YAML"),
    ("p.yaml", "- just\n- a list\n", "a probe file holds an object with a list 'facts', got list"),
    ("p.txt", "{}", "must end in .json, .yaml or .yml"),
])
def test_unreadable_probe_files(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LensError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_probe(path)


def test_missing_probe_file_names_the_builtins(tmp_path):
    with pytest.raises(LensError, match=r"does not exist; .*default"):
        load_probe(tmp_path / "nope.yaml")


# --- the CLI ---------------------------------------------------------------------------


def test_cli_bad_probe_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, _bad(lambda d: d["facts"][1].pop("answer")))
    monkeypatch.chdir(TESTS.parent)
    out = tmp_path / "out"
    status = main(["tests/models/tiny-gpt2", "--probe", str(path), "--out_dir", str(out)])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "fact 1 (fr): missing field 'answer'" in err
    assert not out.exists()
