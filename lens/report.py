"""One model, one probe: run the passes, summarise, and build the output files.

``analyse`` returns everything as plain values; ``lens.outputs.run_files`` turns
them into canonical bytes keyed by file name. The CLI and the golden tests call both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lens import summaries
from lens.aggregate import FactRecords, aggregate_report
from lens.config import Fact, Probe, RunConfig
from lens.errors import LensError
from lens.forwards import Forwards, windows
from lens.lenses import LensParts, NormLens, RawLens, resolve_lenses
from lens.metrics import entropy_bits
from lens.model import LoadedModel, head_logits, tokenize
from lens.passes import Analysis, Pass, PassResult, passes_for, run_passes
from lens.records import ConsistencyRecord, NextTokenRecord, RawCheckRecord, Record
from lens.timing import StageTimer, maybe_stage
from lens.tokens import TokenTable
from lens.unembed import Unembed, analysis_dtype, unembed_dtype

NORM_ALIGNMENT = {"pre_norm": "using_next_ln1_then_ln_final", "post_norm": "using_same_block_ln2",
                  "sublayer_norm": "using_ln_final_no_pre_norm_in_blocks"}
"""``diagnostics.norm_alignment_fix`` per block shape (``lens.wiring.Architecture``)."""

FactProgressFn = Callable[[int, int, str], None]
"""``progress(facts_done, facts_total, last_fact_id)``, called as facts complete."""


@dataclass(frozen=True, eq=False)
class FactRun:
    """One fact's passes and its report."""

    fact: Fact
    passes: tuple[PassResult, ...]
    report: dict[str, Any]
    """The report a probe holding only this fact would write (the keys of docs/outputs.md)."""


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
    sidecar_lenses: tuple[str, ...] = ()
    """The sidecar lenses that decoded (their CSVs are written), in ``--lenses`` order."""

    @property
    def passes(self) -> tuple[PassResult, ...]:
        return tuple(p for f in self.facts for p in f.passes)


def build_analysis(model: LoadedModel, config: RunConfig, *,
                   progress: Callable[[str, int, int], None] | None = None) -> Analysis:
    """Lenses and shared state for every pass of ``model``.

    ``--lenses`` is settled here, before any pass runs: each chosen lens that
    resolves becomes a sidecar lens (a fitted one with ``--<lens> on`` and
    unusable artifacts raises ``LensError``). The raw lens, unless chosen,
    still decodes the last position for the trajectory plot.
    """
    unembed = Unembed(model.W_U, model.b_U, head=model.head,
                      dtype=unembed_dtype(model.dtype, fp32_unembed=config.fp32_unembed))
    parts = LensParts(config=config, name=model.name, model=model, unembed=unembed,
                      norms=tuple(model.norms))
    resolved = resolve_lenses(config.lenses, parts)
    raw = RawLens(unembed)
    return Analysis(
        model=model, lens=NormLens(unembed, model.norms), raw=raw, config=config,
        table=TokenTable(model.tokenizer), head_transform=model.head.as_json(),
        progress=progress,
        sidecar_lenses=tuple(r.lens for r in resolved.values() if r.lens is not None),
        resolver_summaries={n: r.summary for n, r in resolved.items() if r.summary is not None},
        next_token_lenses=() if "raw" in resolved else (raw,),
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


def _named(fact: Fact, p: Pass, exc: LensError) -> LensError:
    return LensError(f"fact {fact.id} ({p.prompt_id}/{p.variant}): {exc}")


def _token_ids(analysis: Analysis, fact: Fact, p: Pass) -> list[int]:
    try:
        return p.token_ids(analysis)
    except LensError as exc:
        raise _named(fact, p, exc) from exc


def _run_chunk(analysis: Analysis, chunk: Sequence[tuple[Fact, Pass]],
               batches: Sequence[Sequence[Sequence[int]]], forwards: Forwards, *,
               timer: StageTimer | None = None) -> list[PassResult]:
    """Run a chunk of passes: their forwards, then each lens's rows of all of them decoded
    together (``lens.passes.run_passes``); the whole timed as ``passes/all``.

    ``forwards`` runs the prompts it has not run yet (``lens.forwards.Forwards``),
    one forward batch per entry of ``batches`` (the passes' ids, in order). A
    ``LensError`` makes the passes run one by one, so that the error names
    its fact and pass.
    """
    with maybe_stage(timer, "passes/all"):
        with maybe_stage(timer, "breakdown/capture"):
            caps = [cap for ids in batches for cap in forwards.take(ids)]
        try:
            return run_passes(analysis, [(p, cap) for (_, p), cap in zip(chunk, caps, strict=True)],
                              timer=timer)
        except LensError:
            pass  # run them one by one below, so that the error names its fact and pass
        results = []
        for (fact, p), cap in zip(chunk, caps, strict=True):
            try:
                results.append(p.run(analysis, cap, timer=timer))
            except LensError as exc:
                raise _named(fact, p, exc) from exc
        return results


def analyse(model: LoadedModel, probe: Probe, config: RunConfig, *,
            progress: Callable[[str, int, int], None] | None = None,
            fact_progress: FactProgressFn | None = None,
            fact_done: Callable[[Fact, Sequence[PassResult]], None] | None = None,
            timer: StageTimer | None = None) -> ModelRun:
    """Run every pass of every fact of the probe and assemble the reports.

    A one-fact probe runs each pass in its own forward (so its outputs are the
    reference bytes); a probe with more facts runs its passes, fact by fact,
    in padded batches of ``config.batch_size`` prompts, the passes of several
    batches decoded together (``lens.forwards.windows``). Either way a prompt
    that recurs (a fact's prompt as another's control) is forwarded once, and
    the rows of a window's passes are decoded together. Residuals are kept only with
    ``config.keep_residuals``. ``progress`` is told ``(pass label, layer,
    n_layers)`` as layers are decoded; ``fact_progress`` ``(done, total, fact id)``
    as facts complete; ``fact_done`` each fact and its passes' results as soon
    as they are all done, in probe order (where a core is idle, the run starts
    drawing its heatmap, ``lens.plotpool.draw_beside_decode``);
    ``timer`` gets ``passes/all``, ``breakdown/*`` and ``head_probes`` seconds.
    """
    analysis = build_analysis(model, config, progress=progress)
    plan = [(fact, p) for fact in probe.facts for p in passes_for(fact)]
    size = config.batch_size if probe.is_multi else len(plan)
    ids = [_token_ids(analysis, fact, p) for fact, p in plan]
    forwards = Forwards(model, ids, padded=probe.is_multi)
    by_fact: dict[str, list[PassResult]] = {f.id: [] for f in probe.facts}
    last_pass = {fact.id: i for i, (fact, _) in enumerate(plan)}
    done = 0
    per_token = (model.n_layers + 1) * model.d_model
    for window in windows([len(i) for i in ids], size, per_token):
        start, stop = window[0][0], window[-1][1]
        chunk = plan[start:stop]
        results = _run_chunk(analysis, chunk, [ids[a:b] for a, b in window], forwards,
                             timer=timer)
        for (fact, _), res in zip(chunk, results, strict=True):
            by_fact[fact.id].append(res if config.keep_residuals else replace(res, capture=None))
        finished = sum(1 for i in last_pass.values() if i < stop)
        if finished > done:
            for fact in probe.facts[done:finished]:
                if fact_done is not None:
                    fact_done(fact, by_fact[fact.id])
            done = finished
            if fact_progress is not None:
                fact_progress(done, len(probe.facts), probe.facts[done - 1].id)
    analysis.workspace.release()  # the decode buffers: not held through the head probes
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
        def per_fact(lens: str) -> FactRecords:
            return [(fr.fact.id, _pure(fr.passes, lens, "pos", "orig"),
                     _pure(fr.passes, lens, "pos", "no_filler") if fr.fact.no_filler else None)
                    for fr in facts]

        aggregate = aggregate_report(
            model_id=model.model_id, probe=probe.name, n_layers=model.n_layers,
            lens=analysis.lens.name, facts=per_fact(analysis.lens.name),
            sidecars={lens.name: per_fact(lens.name) for lens in analysis.sidecar_lenses})
    return ModelRun(model=model, probe=probe, facts=facts, records=records, report=report,
                    aggregate=aggregate,
                    sidecar_lenses=tuple(lens.name for lens in analysis.sidecar_lenses))


def _pure(results: Sequence[PassResult], lens: str, prompt_id: str,
          variant: str) -> list[NextTokenRecord]:
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
        "norm_alignment_fix": NORM_ALIGNMENT[model.architecture],
        "layer0_norm_fix": "using_real_ln1_on_embeddings",
        "mixed_precision_fix": "casting_to_fp32_before_unembed" if shadow else "not_needed",
        "layer0_position_info": ("additive_pos_embed_included" if model.additive_positions
                                 else "token_only_rotary_model"),
        "context_prompt": orig.ctx.prompt,
        "target_prediction": fact.answer,
        "gold_alignment": orig.ctx.gold.status,
        **{f"{name}_summary": dict(summary)
           for name, summary in analysis.resolver_summaries.items()},
        "lens_summaries": {
            lens.name: summaries.lens_summary(_pure(results, lens.name, "pos", "orig"))
            for lens in analysis.sidecar_lenses},
        "last_layer_consistency": summaries.consistency_summary(consistency),
        **summaries.collapse_summary(pure_orig, copy_threshold=config.copy_threshold,
                                     copy_window_k=config.copy_window_k),
        "non_finite": summaries.non_finite_summary(
            [(f"{r.ctx.prompt_id}/{r.ctx.variant}", r.non_finite_layer) for r in results]),
    }
    report: dict[str, Any] = {
        "prompt": {"type": "prompt", "context_prompt": orig.ctx.prompt,
                   "ground_truth": fact.answer},
        "diagnostics": diagnostics,
        "raw_lens_check": summaries.raw_lens_summary(config.raw_lens, raw_samples),
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
        tests = head_logits(model, [tokenize(model, p) for p in fact.test_prompts])
        report["test_prompts"] = [
            _head_entry("test_prompt", table, logits, 10, dtype, prompt=p)
            for p, logits in zip(fact.test_prompts, tests, strict=True)
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


