"""One model, one probe: run the passes, summarise, and build the output files.

``analyse`` returns everything as plain values; ``output_files`` turns them into
canonical bytes keyed by file name. The CLI and the golden tests call both.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lens import summaries
from lens.aggregate import aggregate_report
from lens.config import Fact, Probe, RunConfig
from lens.emitters import (
    ConsistencyRecord,
    NextTokenRecord,
    PositionRecord,
    RawCheckRecord,
    Record,
)
from lens.errors import LensError
from lens.lenses import NormLens, RawLens
from lens.metrics import entropy_bits
from lens.model import Capture, LoadedModel, capture_batch, head_logits, tokenize
from lens.passes import Analysis, Pass, PassResult, passes_for
from lens.prism import resolve_prism
from lens.tuned import resolve_tuned
from lens.timing import StageTimer, maybe_stage
from lens.tokens import TokenTable
from lens.unembed import Unembed, analysis_dtype, unembed_dtype
from lens.writers import csv_bytes, json_bytes

TOPK_SLOTS = 20
SCALE_KEYS = ("final_logit_scale", "logit_scale", "final_logits_scale")
SOFTCAP_KEYS = ("final_logit_softcap", "logit_softcap", "final_logits_softcap", "softcap")
PURE_EXTRA = ("copy_collapse", "entropy_collapse", "is_answer", "p_top1", "p_top5", "p_answer",
              "kl_to_final_bits", "answer_rank", "cos_to_final", "control_margin")
RECORDS_HEADER = (
    "prompt_id", "prompt_variant", "layer", "pos", "token", "entropy",
    *(f"{kind}{i}" for i in range(1, TOPK_SLOTS + 1) for kind in ("top", "prob")),
    "rest_mass",
)
PURE_HEADER = (*RECORDS_HEADER, *PURE_EXTRA)
FACT_COLUMN = "fact_id"
"""Leading column of the records CSVs when a probe has more than one fact."""

FactProgressFn = Callable[[int, int, str], None]
"""``progress(facts_done, facts_total, last_fact_id)``, called as facts complete."""


@dataclass(frozen=True, eq=False)
class FactRun:
    """One fact's passes and its SPEC report."""

    fact: Fact
    passes: tuple[PassResult, ...]
    report: dict[str, Any]
    """The report a probe holding only this fact would write (SPEC §6 keys)."""


@dataclass(frozen=True, eq=False)
class ModelRun:
    """Everything one model's run produced, before it becomes bytes."""

    model: LoadedModel
    probe: Probe
    facts: tuple[FactRun, ...]
    records: tuple[Record, ...]
    """Every fact's records, fact by fact in probe order, each in pass order."""
    report: dict[str, Any]
    """``output-<name>.json``: the first fact's report, plus ``probe`` and ``facts``
    when the probe has more than one fact."""
    aggregate: dict[str, Any] | None
    """``output-<name>-aggregate.json`` (probes with more than one fact), else None."""

    @property
    def passes(self) -> tuple[PassResult, ...]:
        return tuple(p for f in self.facts for p in f.passes)


def head_transform(hf_config: Any) -> dict[str, float | None]:
    """Logit scale and softcap declared by the model config (SPEC §6)."""
    def first(keys: Sequence[str]) -> float | None:
        for key in keys:
            value = getattr(hf_config, key, None)
            if isinstance(value, int | float) and not isinstance(value, bool) and value:
                return float(value)
        return None

    return {"scale": first(SCALE_KEYS), "softcap": first(SOFTCAP_KEYS)}


def build_analysis(model: LoadedModel, config: RunConfig, *,
                   progress: Callable[[str, int, int], None] | None = None) -> Analysis:
    """Lenses and shared state for every pass of ``model``.

    ``--prism`` is settled here, before any pass runs: ``on`` with missing or
    incompatible artifacts raises ``LensError``; a usable Prism lens becomes a
    sidecar lens, so the same emitters write its CSVs.
    """
    unembed = Unembed(model.W_U, model.b_U,
                      dtype=unembed_dtype(model.dtype, fp32_unembed=config.fp32_unembed))
    prism = resolve_prism(config, name=model.name, model=model, unembed=unembed,
                          norms=model.norms)
    tuned = resolve_tuned(config, name=model.name, model=model, unembed=unembed,
                          norms=model.norms)
    raw = RawLens(unembed)
    return Analysis(
        model=model, lens=NormLens(unembed, model.norms), raw=raw, config=config,
        table=TokenTable(model.tokenizer), head_transform=head_transform(model.hf_config),
        progress=progress,
        sidecar_lenses=tuple(r.lens for r in (prism, tuned) if r.lens is not None),
        prism_summary=prism.summary, tuned_summary=tuned.summary,
        next_token_lenses=(raw,),
    )


def _topk_json(table: TokenTable, logp: torch.Tensor, k: int) -> list[list[Any]]:
    top_logp, top_ids = torch.topk(logp, min(k, logp.shape[-1]))
    return [[t, p] for t, p in zip(table.texts(top_ids.tolist()), top_logp.exp().tolist(),
                                   strict=True)]


def _head_entry(kind: str, table: TokenTable, logits: torch.Tensor, k: int, dtype: torch.dtype,
                **extra: Any) -> dict[str, Any]:
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    return {"type": kind, **extra, "entropy": float(entropy_bits(logp)),
            "topk": _topk_json(table, logp, k)}


def _norm_name(spec: Any) -> str:
    return str(spec.kind)


def _run_chunk(analysis: Analysis, chunk: Sequence[tuple[Fact, Pass]],
               timer: StageTimer | None = None) -> list[PassResult]:
    """Run a chunk of passes: one forward each when alone, one padded forward when several."""
    def named(fact: Fact, p: Pass, exc: LensError) -> LensError:
        return LensError(f"fact {fact.id} ({p.prompt_id}/{p.variant}): {exc}")

    caps: list[Capture | None] = [None] * len(chunk)
    if len(chunk) > 1:
        ids = []
        for fact, p in chunk:
            try:
                ids.append(p.token_ids(analysis))
            except LensError as exc:
                raise named(fact, p, exc) from exc
        caps = list(capture_batch(analysis.model, ids))
    results = []
    for (fact, p), cap in zip(chunk, caps, strict=True):
        try:
            with maybe_stage(timer, f"passes/{p.prompt_id}/{p.variant}"):
                results.append(p.run(analysis, cap, timer=timer))
        except LensError as exc:
            raise named(fact, p, exc) from exc
    return results


def analyse(model: LoadedModel, probe: Probe, config: RunConfig, *,
            progress: Callable[[str, int, int], None] | None = None,
            fact_progress: FactProgressFn | None = None,
            timer: StageTimer | None = None) -> ModelRun:
    """Run every pass of every fact of the probe and assemble the reports.

    A one-fact probe runs each pass in its own forward (so its outputs are the
    reference bytes); a probe with more facts runs its passes, fact by fact,
    in padded batches of ``config.batch_size`` prompts. Residuals are kept only
    with ``config.keep_residuals``. ``progress`` is told ``(pass label, layer,
    n_layers)`` as layers are decoded; ``fact_progress`` ``(done, total, fact id)``
    as facts complete; ``timer`` gets ``passes/<prompt_id>/<variant>`` (summed over
    facts) and ``head_probes`` seconds.
    """
    analysis = build_analysis(model, config, progress=progress)
    plan = [(fact, p) for fact in probe.facts for p in passes_for(fact)]
    size = config.batch_size if probe.is_multi else 1
    by_fact: dict[str, list[PassResult]] = {f.id: [] for f in probe.facts}
    last_pass = {fact.id: i for i, (fact, _) in enumerate(plan)}
    done = 0
    for start in range(0, len(plan), size):
        chunk = plan[start:start + size]
        for (fact, _), res in zip(chunk, _run_chunk(analysis, chunk, timer), strict=True):
            by_fact[fact.id].append(res if config.keep_residuals else replace(res, capture=None))
        finished = sum(1 for i in last_pass.values() if i < start + size)
        if fact_progress is not None and finished > done:
            done = finished
            fact_progress(done, len(probe.facts), probe.facts[done - 1].id)
    facts = tuple(
        FactRun(fact=f, passes=tuple(by_fact[f.id]),
                report=_report(model, f, analysis, by_fact[f.id], timer=timer))
        for f in probe.facts
    )
    records = tuple(r for fr in facts for res in fr.passes for r in res.records)
    report = facts[0].report
    aggregate = None
    if probe.is_multi:
        report = {**report,
                  "probe": {"name": probe.name, "n_facts": len(facts),
                            "fact_ids": [fr.fact.id for fr in facts]},
                  "facts": {fr.fact.id: fr.report for fr in facts}}
        lens = analysis.lens.name
        aggregate = aggregate_report(
            model_id=model.model_id, probe=probe.name, n_layers=model.n_layers, lens=lens,
            facts=[(fr.fact.id, _pure(fr.passes, lens, "pos", "orig"),
                    _pure(fr.passes, lens, "pos", "no_filler") if fr.fact.no_filler else None)
                   for fr in facts])
    return ModelRun(model=model, probe=probe, facts=facts, records=records, report=report,
                    aggregate=aggregate)


def _pure(results: Sequence[PassResult], lens: str, prompt_id: str, variant: str) -> list[NextTokenRecord]:
    return [r for res in results for r in res.records
            if isinstance(r, NextTokenRecord) and r.lens == lens
            and r.prompt_id == prompt_id and r.variant == variant]


def _report(model: LoadedModel, fact: Fact, analysis: Analysis,
            results: Sequence[PassResult], *, timer: StageTimer | None = None) -> dict[str, Any]:
    config, table, lens = analysis.config, analysis.table, analysis.lens.name
    orig = results[0]
    dtype = analysis_dtype(model.dtype)
    orig_records = [r for r in orig.records if r.lens == lens]
    raw_samples = [r for r in orig_records if isinstance(r, RawCheckRecord)]
    consistency = next((r for r in orig_records if isinstance(r, ConsistencyRecord)), None)
    pure_orig = _pure(results, lens, "pos", "orig")
    ln0, ln_final = model.norms[0], model.norms[-1]
    shadow = analysis.lens.unembed.is_shadow
    diagnostics: dict[str, Any] = {
        "type": "diagnostics",
        "model": model.model_id,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "use_norm_lens": True,
        "use_fp32_unembed": shadow,
        "unembed_dtype": str(analysis.lens.unembed.dtype),
        "first_block_ln1_type": _norm_name(ln0),
        "final_ln_type": _norm_name(ln_final),
        "layernorm_bias_fix": "active" if ln0.kind == "LayerNorm" else "not_needed_rms_model",
        "norm_alignment_fix": ("using_next_ln1_then_ln_final" if model.architecture == "pre_norm"
                               else "using_same_block_ln2"),
        "layer0_norm_fix": "using_real_ln1_on_embeddings",
        "mixed_precision_fix": "casting_to_fp32_before_unembed" if shadow else "not_needed",
        "layer0_position_info": ("additive_pos_embed_included" if model.additive_positions
                                 else "token_only_rotary_model"),
        "context_prompt": orig.ctx.prompt,
        "target_prediction": fact.answer,
        "gold_alignment": orig.ctx.gold.status,
        "prism_summary": dict(analysis.prism_summary),
        "tuned_summary": dict(analysis.tuned_summary),
        "last_layer_consistency": summaries.consistency_summary(consistency),
        "raw_lens_check": summaries.raw_lens_summary(config.raw_lens, raw_samples),
        **summaries.collapse_summary(pure_orig, copy_threshold=config.copy_threshold,
                                     copy_window_k=config.copy_window_k),
        "non_finite": summaries.non_finite_summary(
            [(f"{r.ctx.prompt_id}/{r.ctx.variant}", r.non_finite_layer) for r in results]),
    }
    report: dict[str, Any] = {
        "prompt": {"type": "prompt", "context_prompt": orig.ctx.prompt,
                   "ground_truth": fact.answer},
        "diagnostics": diagnostics,
        "gold_answer": orig.ctx.gold.as_json(),
        "ablation_summary": summaries.ablation_summary(
            pure_orig, _pure(results, lens, "pos", "no_filler")),
    }
    control = next((res for res in results if res.ctx.prompt_id == "ctl"), None)
    if control is not None:
        report["control_prompt"] = {"context_prompt": control.ctx.prompt,
                                    "gold_answer": control.ctx.gold.as_json(),
                                    "gold_alignment": control.ctx.gold.status}
        report["control_summary"] = summaries.control_summary(_pure(results, lens, "ctl", "orig"))
    head = orig.ctx.head_logits
    report["final_prediction"] = _head_entry("final_prediction", table, head, 20, dtype)
    with maybe_stage(timer, "head_probes"):
        report["test_prompts"] = [
            _head_entry("test_prompt", table, head_logits(model, tokenize(model, p)), 10, dtype,
                        prompt=p)
            for p in fact.test_prompts
        ]
    report["temperature_exploration"] = [
        _head_entry("temperature_exploration", table, head / t, 15, dtype, temperature=t)
        for t in (0.1, 2.0)
    ]
    report["model_stats"] = {
        "type": "model_stats", "num_layers": model.n_layers, "d_model": model.d_model,
        "n_heads": model.n_heads, "d_vocab": model.d_vocab, "n_ctx": model.n_ctx,
        "architecture": model.architecture,
    }
    return report


def _prefix(r: PositionRecord | NextTokenRecord) -> list[Any]:
    cells: list[Any] = [r.prompt_id, r.variant, r.layer, r.pos, r.token, r.entropy]
    for i in range(TOPK_SLOTS):
        cells.extend(r.topk[i] if i < len(r.topk) else (None, None))
    cells.append(r.rest_mass)
    return cells


def records_csv(records: Sequence[Record], lens: str, *, fact_column: bool = False) -> bytes:
    """The per-position CSV of ``lens``; ``fact_column`` adds a leading ``fact_id``."""
    lead = (FACT_COLUMN,) if fact_column else ()
    rows = [[*((r.fact_id,) if fact_column else ()), *_prefix(r)]
            for r in records if isinstance(r, PositionRecord) and r.lens == lens]
    return csv_bytes((*lead, *RECORDS_HEADER), rows)


def pure_csv(records: Sequence[Record], lens: str, *, fact_column: bool = False) -> bytes:
    """The pure next-token CSV of ``lens``; ``fact_column`` adds a leading ``fact_id``."""
    lead = (FACT_COLUMN,) if fact_column else ()
    rows = [[*((r.fact_id,) if fact_column else ()), *_prefix(r),
             *(getattr(r, f) for f in PURE_EXTRA)]
            for r in records if isinstance(r, NextTokenRecord) and r.lens == lens]
    return csv_bytes((*lead, *PURE_HEADER), rows)


def output_files(run: ModelRun, config: RunConfig) -> dict[str, bytes]:
    """File name → canonical bytes for one model's run (SPEC §8).

    A probe with more than one fact adds the ``fact_id`` column to the CSVs and
    writes ``output-<name>-aggregate.json``; a one-fact probe writes exactly the
    SPEC files.
    """
    name, multi = run.model.name, run.probe.is_multi
    files = {
        f"output-{name}.json": json_bytes(run.report),
        f"output-{name}-records.csv": records_csv(run.records, "norm", fact_column=multi),
        f"output-{name}-pure-next-token.csv": pure_csv(run.records, "norm", fact_column=multi),
    }
    for lens in ("prism", "tuned"):
        if any(r.lens == lens for r in run.records):
            files[f"output-{name}-records-{lens}.csv"] = records_csv(run.records, lens,
                                                                     fact_column=multi)
            files[f"output-{name}-pure-next-token-{lens}.csv"] = pure_csv(run.records, lens,
                                                                          fact_column=multi)
    if run.aggregate is not None:
        files[f"output-{name}-aggregate.json"] = json_bytes(run.aggregate)
    if config.keep_residuals:
        buffer = io.BytesIO()
        torch.save({("" if not multi else f"{p.ctx.fact_id}/") + f"{p.ctx.prompt_id}/{p.ctx.variant}":
                    p.capture.resids.cpu() for p in run.passes if p.capture is not None}, buffer)
        files[f"output-{name}-residuals.pt"] = buffer.getvalue()
    return files
