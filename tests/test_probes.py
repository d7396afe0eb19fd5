"""Probe files: loading, validation errors, built-ins, --probe, and multi-fact outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lens.config import RunConfig
from lens.errors import LensError
from lens.probe import (
    FACT_KEYS,
    builtin_probe,
    builtin_probes,
    default_probe,
    load_probe,
    parse_probe,
    resolve_probe,
)
from lens.report import analyse, output_files
from lens.run import main
from lens.worker import FactProgress
from lens.writers import FACT_COLUMN, PURE_HEADER, RECORDS_HEADER, read_csv_dicts, read_csv_rows

TESTS = Path(__file__).resolve().parent
TINY_PROBE = TESTS / "probes" / "tiny-multi.yaml"
SPEC_KEYS = ["prompt", "diagnostics", "gold_answer", "ablation_summary", "control_prompt",
             "control_summary", "final_prediction", "test_prompts", "temperature_exploration",
             "model_stats"]

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


def test_fact_keys_are_documented_in_the_readme():
    readme = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    for key in FACT_KEYS:
        assert f"`{key}`" in readme


def test_the_readme_example_is_a_valid_probe():
    readme = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    probe = parse_probe(yaml.safe_load(example), "README.md")
    assert [f.id for f in probe.facts] == ["germany", "france"]
    assert probe.facts[0].control.answer == "Paris" and probe.facts[0].test_prompts


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


def test_cli_batch_size_must_be_positive(run_lens):
    status, files, err = run_lens("tests/models/tiny-gpt2", "--batch-size", "0")
    assert status == 1 and "--batch-size must be at least 1" in err and not files


# --- multi-fact outputs ----------------------------------------------------------------


def _rows(data: bytes) -> list[dict[str, str]]:
    return read_csv_dicts(data)


@pytest.fixture(scope="module")
def multi_runs(tiny_models):  # type: ignore[no-untyped-def]
    probe = load_probe(TINY_PROBE)
    config = RunConfig(dtype="float64", device="cpu")
    return {name: analyse(model, probe, config) for name, model in tiny_models.items()}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_multi_fact_csvs_lead_with_fact_id(multi_runs, name):
    run = multi_runs[name]
    files = output_files(run, RunConfig(dtype="float64"))
    records = read_csv_rows(files[f"output-{name}-records.csv"])
    pure = read_csv_rows(files[f"output-{name}-pure-next-token.csv"])
    assert tuple(records[0]) == (FACT_COLUMN, *RECORDS_HEADER)
    assert tuple(pure[0]) == (FACT_COLUMN, *PURE_HEADER)
    ids = [f.id for f in run.probe.facts]
    seen = list(dict.fromkeys(r[0] for r in pure[1:]))
    assert seen == ids  # every fact, in probe order, grouped
    n = run.model.n_layers + 1
    for fact in run.probe.facts:
        rows = [r for r in _rows(files[f"output-{name}-pure-next-token.csv"])
                if r["fact_id"] == fact.id]
        variants = [("pos", "orig"), *([("pos", "no_filler")] if fact.no_filler else []),
                    *([("ctl", "orig")] if fact.control else [])]
        assert [(r["prompt_id"], r["prompt_variant"]) for r in rows] == [
            v for v in variants for _ in range(n)]
    assert {r[0] for r in records[1:]} == set(ids)
    assert f"output-{name}-aggregate.json" in files


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_multi_fact_json_keeps_spec_keys_and_holds_every_fact(multi_runs, tiny_models, name):
    run = multi_runs[name]
    report = json.loads(output_files(run, RunConfig())[f"output-{name}.json"])
    assert list(report) == [*SPEC_KEYS, "probe", "facts"]
    assert report["probe"] == {"name": "tiny-multi", "n_facts": 4,
                               "fact_ids": ["germany", "france", "germany-known-as",
                                            "germany.named"]}
    assert list(report["facts"]) == report["probe"]["fact_ids"]
    first = report["facts"]["germany"]
    assert {k: v for k, v in report.items() if k not in ("probe", "facts")} == first
    known = report["facts"]["germany-known-as"]
    assert "control_prompt" not in known and known["ablation_summary"]["L_sem_nf"] is None
    assert [t["prompt"] for t in known["test_prompts"]] == [
        "Germany has its capital at", "Germany's capital city is called"]
    # facts[id] is what a one-fact probe of that fact writes (up to batching's last bits)
    single = analyse(tiny_models[name], parse_probe({"facts": [
        {"id": "france", "prompt": "The capital of France is called simply", "answer": "Paris",
         "no_filler": "The capital of France is called",
         "control": {"prompt": "The capital of Germany is called simply", "answer": "Berlin"},
         "important_words": ["France", "Paris", "capital"]}]}, "one.json"),
        RunConfig(dtype="float64", device="cpu"))
    alone = json.loads(output_files(single, RunConfig())[f"output-{name}.json"])
    assert _close(report["facts"]["france"], alone)


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-9 + 1e-7 * abs(float(b))  # type: ignore[arg-type]
    return a == b


def test_progress_reports_every_fact_once(tiny_models):
    calls: list[tuple[int, int, str]] = []
    probe = load_probe(TINY_PROBE)
    analyse(tiny_models["tiny-gpt2"], probe, RunConfig(dtype="float64", batch_size=3),
            fact_progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == sorted({c[0] for c in calls})  # strictly increasing
    assert calls[-1][:2] == (4, 4) and all(c[1] == 4 for c in calls)


def test_fact_progress_line(capsys):
    show = FactProgress("m")
    show(1, 2, "a")
    show(2, 2, "b")
    err = capsys.readouterr().err
    assert err == "\r\x1b[2Klens: m: fact 1/2 (a)\r\x1b[2Klens: m: fact 2/2 (b)\n"


def test_cli_without_tty_prints_no_progress(run_lens):
    status, files, err = run_lens("tests/models/tiny-llama", "--probe", str(TINY_PROBE),
                                  "--no-plots")
    assert status == 0 and err == ""
    assert "output-tiny-llama-aggregate.json" in files
    assert not any(n.endswith(".png") for n in files)


def test_multi_fact_residuals_are_keyed_by_fact(run_lens):
    import io

    import torch

    status, files, err = run_lens("tests/models/tiny-gpt2", "--probe", str(TINY_PROBE),
                                  "--keep-residuals", "--no-plots")
    assert status == 0, err
    saved = torch.load(io.BytesIO(files["output-tiny-gpt2-residuals.pt"]))
    assert list(saved)[:4] == ["germany/pos/orig", "germany/pos/no_filler", "germany/ctl/orig",
                               "france/pos/orig"]
    assert "germany-known-as/pos/orig" in saved and "germany-known-as/ctl/orig" not in saved
    assert saved["germany/pos/orig"].shape[0] == 5


def test_a_failing_fact_is_named(tmp_path, run_lens):
    doc = {"facts": [{"id": "ok", "prompt": "The capital of France is called", "answer": "Paris"},
                     {"id": "long", "prompt": " ".join(["Germany"] * 80), "answer": "Berlin"}]}
    status, files, err = run_lens("tests/models/tiny-gpt2", "--probe", str(_write(tmp_path, doc)))
    assert status == 1 and list(files) == ["output-tiny-gpt2.error.json"]
    assert len(err.strip().splitlines()) == 1
    assert "fact long (pos/orig): prompt has 81 tokens but tiny-gpt2 takes at most 64" in err
