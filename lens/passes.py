"""Passes: one prompt variant, one forward, every layer decoded by every lens.

A subclass says only which prompt and gold answer it uses and which emitters
it feeds; ``Pass.routes`` turns that into the pass's routing table, one
``Route`` (lens, rows decoded, emitters) per lens, so every lens reaches the
emitters by the same road and decodes only the rows its emitters read.
``run_passes`` runs the routes of any number of forwarded passes, each lens's
rows of all of them decoded together (``lens.decode.decode_many``): the
passes of one fact, or of a batch of facts. ``Pass.run`` is that for one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, final

import torch

from lens.config import Fact, RunConfig
from lens.decode import Workspace, decode_many
from lens.diagnostic_emitters import LastLayerConsistency, RawLensCheck, prefetch_raw_checks
from lens.emitters import Emitter, NextTokenEmitter, PassContext, PositionEmitter, Record, Rows
from lens.gold import align, encode
from lens.lenses import Lens, RawLens
from lens.model import Capture, LoadedModel, capture, tokenize
from lens.timing import StageTimer, maybe_iterate, maybe_stage
from lens.tokens import TokenTable
from lens.unembed import analysis_dtype

PUNCT_STRIP = ".,!?;:"


@dataclass(frozen=True, eq=False)
class PassResult:
    ctx: PassContext
    records: tuple[Record, ...]
    capture: Capture | None
    """The forward's residuals; dropped (None) after the run unless they are kept."""
    non_finite_layer: int | None = None
    """The first layer whose residual (or, as layer n+1, the model's head) is not finite."""


@dataclass(frozen=True, eq=False)
class Analysis:
    """What every pass of one model shares: the model, its lenses and the run config."""

    model: LoadedModel
    lens: Lens
    """The primary lens."""
    raw: RawLens
    config: RunConfig
    table: TokenTable
    head_transform: dict[str, Any]
    """``cfg_transform`` of the model's head (``lens.unembed.HeadTransform.as_json``)."""
    sidecar_lenses: tuple[Lens, ...] = ()
    """The ``--lenses`` that resolved to a lens, in that order: their records go to
    sidecar CSVs, fed by the same emitters as the primary's."""
    progress: Callable[[str, int, int], None] | None = None
    """Told ``(pass label, layer, n_layers)`` after each decoded layer (progress display)."""
    resolver_summaries: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per chosen lens whose resolver says something (fitted lenses: the artifacts used
    or why not): ``diagnostics.<lens>_summary``, settled before any pass runs."""
    next_token_lenses: tuple[Lens, ...] = ()
    """Lenses decoded at the last position only, feeding pure next-token records that
    no CSV holds (the raw lens at every layer, for the trajectory plot)."""
    workspace: Workspace = field(default_factory=Workspace)
    """The decode buffers every pass of this run reuses (``lens.decode.Workspace``)."""


def is_verbose(token: str, words: Sequence[str]) -> bool:
    """Whether a position gets the long top-k: its token contains an important word."""
    text = token.strip().strip(PUNCT_STRIP).lower()
    return bool(text) and any(w.lower() in text for w in words)


@dataclass(frozen=True, eq=False)
class Route:
    """One row of a pass's routing table: a lens, the rows it decodes, the emitters it feeds."""

    lens: Lens
    rows: Rows
    """``all`` when an emitter reads every position, else ``last`` (one row per layer)."""
    emitters: tuple[Emitter, ...]
    label: str
    """Progress display: the pass, plus the lens when it is not the primary."""


def route(lens: Lens, emitters: Sequence[Emitter], label: str) -> Route:
    """Decode every position only when one of the emitters reads them."""
    rows: Rows = "all" if any(e.rows == "all" for e in emitters) else "last"
    return Route(lens, rows, tuple(emitters), label)


class Pass:
    """One prompt variant of one fact."""

    prompt_id = "pos"
    variant = "orig"

    def __init__(self, fact: Fact) -> None:
        self.fact = fact

    def prompt(self) -> str:
        return self.fact.prompt

    def answer(self) -> str:
        return self.fact.answer

    def contrast_answer(self) -> str | None:
        """The other answer whose probability the control margin subtracts."""
        return None

    def record_emitters(self) -> list[Emitter]:
        """Emitters whose records go to the CSVs; sidecar lenses get them too."""
        return [NextTokenEmitter()]

    def checks(self, analysis: Analysis) -> list[Emitter]:
        """Emitters that only the primary lens feeds (lens checks)."""
        return []

    def routes(self, analysis: Analysis) -> list[Route]:
        """The routing table: the primary with its record emitters and checks, each
        sidecar lens with the record emitters, each next-token-only lens with the
        pure next-token emitter alone."""
        label = f"{self.prompt_id}/{self.variant}"
        records = self.record_emitters()
        return [
            route(analysis.lens, [*records, *self.checks(analysis)], label),
            *(route(lens, records, f"{label} ({lens.name})") for lens in analysis.sidecar_lenses),
            *(route(lens, [NextTokenEmitter()], f"{label} ({lens.name})")
              for lens in analysis.next_token_lenses),
        ]

    def context(self, analysis: Analysis, cap: Capture, ids: list[int]) -> PassContext:
        model, table = analysis.model, analysis.table
        prompt = self.prompt()
        gold = align(model.tokenizer, table, prompt, self.answer())
        contrast = self.contrast_answer()
        contrast_gold = align(model.tokenizer, table, prompt, contrast) if contrast else None
        tokens = tuple(table.texts(ids))
        head_logits = cap.head_logits[-1].to(analysis_dtype(model.dtype))
        words = self.fact.important_words
        return PassContext(
            prompt_id=self.prompt_id, variant=self.variant, prompt=prompt,
            input_ids=tuple(ids), tokens=tokens,
            context_ids=tuple(encode(model.tokenizer, prompt)),
            gold=gold, contrast_first_id=contrast_gold.first_id if contrast_gold else None,
            head_logits=head_logits, head_logp=torch.log_softmax(head_logits, dim=-1),
            verbose=tuple(i == len(ids) - 1 or is_verbose(t, words) for i, t in enumerate(tokens)),
            n_layers=model.n_layers, config=analysis.config, table=table,
            head_transform=analysis.head_transform, fact_id=self.fact.id,
        )

    def token_ids(self, analysis: Analysis) -> list[int]:
        """The prompt's token ids as the forward sees them."""
        return tokenize(analysis.model, self.prompt())

    @final
    def run(self, analysis: Analysis, cap: Capture | None = None, *,
            timer: StageTimer | None = None) -> PassResult:
        """Forward once, then decode and emit along every route of the routing table.

        Args:
            analysis: The model, lenses and config shared by every pass.
            cap: This pass's forward when it was already run (a row of a
                batched forward, ``lens.model.capture_batch``); else the pass
                runs its own forward.
            timer: Accumulates ``breakdown/capture``, ``breakdown/decode`` and
                ``breakdown/emit`` seconds (optional).
        """
        ids = self.token_ids(analysis)
        return run_passes(analysis, [(self, self._forward(analysis, ids, cap, timer))],
                          timer=timer)[0]

    def _forward(self, analysis: Analysis, ids: list[int], cap: Capture | None,
                 timer: StageTimer | None) -> Capture:
        """This pass's capture: its own forward, or the given one checked against the prompt."""
        if cap is None:
            with maybe_stage(timer, "breakdown/capture"):
                return capture(analysis.model, ids)
        if cap.resids.shape[1] != len(ids):
            raise ValueError(f"capture has {cap.resids.shape[1]} positions, "
                             f"the prompt {len(ids)} tokens")
        return cap


class OrigPass(Pass):
    """pos/orig: per-position records, pure next-token records, raw check, consistency."""

    def record_emitters(self) -> list[Emitter]:
        return [PositionEmitter(), NextTokenEmitter()]

    def checks(self, analysis: Analysis) -> list[Emitter]:
        return [RawLensCheck(analysis.raw), LastLayerConsistency()]


class NoFillerPass(Pass):
    """pos/no_filler: the stylistic ablation (filler word dropped)."""

    variant = "no_filler"

    def prompt(self) -> str:
        return self.fact.no_filler or self.fact.prompt


class ControlPass(Pass):
    """ctl/orig: the negative control; records carry the control margin."""

    prompt_id = "ctl"

    def prompt(self) -> str:
        assert self.fact.control is not None
        return self.fact.control.prompt

    def answer(self) -> str:
        assert self.fact.control is not None
        return self.fact.control.answer

    def contrast_answer(self) -> str | None:
        return self.fact.answer


def passes_for(fact: Fact) -> list[Pass]:
    """The passes a fact asks for, in output order."""
    passes: list[Pass] = [OrigPass(fact)]
    if fact.no_filler:
        passes.append(NoFillerPass(fact))
    if fact.control:
        passes.append(ControlPass(fact))
    return passes


def first_non_finite_layer(cap: Capture) -> int | None:
    """The first layer with a NaN/Inf in the residual stream; n+1 if only the head has one
    (at the positions the capture holds: every one, or the last in a many-fact probe)."""
    bad = ~torch.isfinite(cap.resids).flatten(1).all(dim=1)
    if bool(bad.any()):
        return int(bad.nonzero()[0, 0])
    return None if bool(torch.isfinite(cap.head_logits).all()) else int(cap.resids.shape[0])


@dataclass(frozen=True, eq=False)
class DecodeCall:
    """One ``decode_many`` call of ``run_passes``: a lens and the routes it decodes."""

    lens: Lens
    members: list[tuple[int, int, Rows]]
    """``(pass, route, rows)`` whose rows the call decodes."""
    aliases: list[tuple[int, int, int]]
    """``(pass, route, member)``: last-position routes that read a member's last row."""


def decode_calls(prepared: Sequence[tuple[PassContext, Capture, Sequence[Route]]]
                 ) -> list[DecodeCall]:
    """The decode calls of a chunk of passes: per lens, in order of first use, one call
    for its routes that decode every position, then one for its last-position routes.

    A last-position route whose forward (the same ``Capture``: ``lens.forwards``
    runs a recurring prompt once) is already decoded by a route of its lens
    reads that route's last row instead of decoding it again: ``capitals``
    uses every fact's prompt as another fact's control.
    """
    by_lens: dict[int, tuple[Lens, list[tuple[int, int]], list[tuple[int, int]]]] = {}
    for i, (_, _, routes) in enumerate(prepared):
        for j, r in enumerate(routes):
            entry = by_lens.setdefault(id(r.lens), (r.lens, [], []))
            entry[1 if r.rows == "all" else 2].append((i, j))
    calls = []
    for lens, every, last in by_lens.values():
        full = DecodeCall(lens, [(i, j, "all") for i, j in every], [])
        tail = DecodeCall(lens, [], [])
        owners: dict[int, tuple[DecodeCall, int]] = {}
        for m, (i, _) in enumerate(every):
            owners.setdefault(id(prepared[i][1]), (full, m))
        for i, j in last:
            key = id(prepared[i][1])
            if key in owners:
                call, m = owners[key]
                call.aliases.append((i, j, m))
            else:
                owners[key] = (tail, len(tail.members))
                tail.members.append((i, j, "last"))
        calls += [c for c in (full, tail) if c.members]
    return calls


def run_passes(analysis: Analysis, chunk: Sequence[tuple[Pass, Capture]], *,
               timer: StageTimer | None = None) -> list[PassResult]:
    """Run already-forwarded passes together; each result equals that pass run alone.

    The routes of every pass are grouped by lens and rows (``decode_calls``)
    and each group is decoded by ``decode_many``, so one matmul serves the rows
    of many passes (and one more the raw-lens check rows of all of them,
    ``prefetch_raw_checks``), and a row that two passes share is decoded once;
    every (pass, route) still gets its steps in layer order with its own copy
    window, and a pass's records are joined in routing-table order. ``timer``
    gets ``breakdown/decode`` and ``breakdown/emit`` seconds.
    """
    prepared = []
    for p, cap in chunk:
        ids = p.token_ids(analysis)
        if cap.resids.shape[1] != len(ids):
            raise ValueError(f"capture has {cap.resids.shape[1]} positions, "
                             f"the prompt {len(ids)} tokens")
        prepared.append((p.context(analysis, cap, ids), cap, p.routes(analysis)))
    prefetch_raw_checks([(e, ctx, cap.resids) for ctx, cap, routes in prepared
                         for r in routes for e in r.emitters if isinstance(e, RawLensCheck)])
    widest = max(cap.resids.shape[1] for _, cap, _ in prepared)  # one pass's positions
    sinks: list[list[list[Record]]] = [[[] for _ in routes] for _, _, routes in prepared]
    for call in decode_calls(prepared):
        items = [(prepared[i][0], prepared[i][1].resids if rows == "all"
                  else prepared[i][1].resids[:, -1:]) for i, _, rows in call.members]
        aliases = [(prepared[i][0], source) for i, _, source in call.aliases]
        readers = [(i, j) for i, j, _ in (*call.members, *call.aliases)]
        steps = decode_many(items, call.lens, widest=widest, workspace=analysis.workspace,
                            aliases=aliases)
        for m, step in maybe_iterate(timer, "breakdown/decode", steps):
            i, j = readers[m]
            r = prepared[i][2][j]
            with maybe_stage(timer, "breakdown/emit"):
                for emitter in r.emitters:
                    sinks[i][j].extend(emitter.emit(step))
            if analysis.progress is not None:
                analysis.progress(r.label, step.layer, analysis.model.n_layers)
            del step  # let decode_many free this chunk before decoding the next
    return [PassResult(ctx=ctx, records=tuple(rec for sink in sinks[i] for rec in sink),
                       capture=cap, non_finite_layer=first_non_finite_layer(cap))
            for i, (ctx, cap, _) in enumerate(prepared)]
