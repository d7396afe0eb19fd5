"""Conformance checks for the extension points: emitters and lenses.

Each check is a named function that raises with what failed; ``check_emitter``
and ``check_lens`` run them all. The tests run every (emitter, check) and
(lens, check) pair as its own test, the way scikit-learn's estimator checks
do, so a failure names both.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from lens.emitters import ROWS, LayerStep, RowValues
from lens.lenses import Lens
from lens.records import Record, record_values

EMITTER_CONTRACT = "emit(step: LayerStep) -> Iterable[Record] and rows: 'all' | 'last'"
LENS_CONTRACT = "name: str and transform(resid, layer) -> (seq, d) unembedding input"


def _who(obj: object) -> str:
    return type(obj).__name__


# --- emitters ----------------------------------------------------------------------


def check_emit_signature(emitter: object, step: LayerStep) -> None:
    """``emit`` exists and takes exactly one positional argument, the step."""
    emit = getattr(emitter, "emit", None)
    if not callable(emit):
        raise TypeError(f"{_who(emitter)} is not an Emitter: it has no method {EMITTER_CONTRACT}")
    params = list(inspect.signature(emit).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(positional) != 1 or required not in ([], positional):
        raise TypeError(f"{_who(emitter)}.emit{inspect.signature(emit)} does not match the "
                        f"Emitter contract {EMITTER_CONTRACT}")


def check_rows(emitter: object, step: LayerStep) -> None:
    """``rows`` says which positions ``emit`` reads: ``all`` or ``last``."""
    rows = getattr(emitter, "rows", None)
    if rows not in ROWS:
        raise TypeError(f"{_who(emitter)}.rows is {rows!r}, not one of {ROWS}: "
                        f"the Emitter contract is {EMITTER_CONTRACT}")


def check_pure(emitter: object, step: LayerStep) -> None:
    """Two calls on the same step give equal records."""
    if list(emitter.emit(step)) != list(emitter.emit(step)):  # type: ignore[attr-defined]
        raise ValueError(f"{_who(emitter)}.emit is not pure: two calls on the same step differ")


def check_step_untouched(emitter: object, step: LayerStep) -> None:
    """``emit`` leaves the step's tensors as they were."""
    tensors = (step.resid, step.logits, step.logp, step.entropy, step.top_p, step.top_ids)
    before = [t.clone() for t in tensors]
    list(emitter.emit(step))  # type: ignore[attr-defined]
    if not all(torch.equal(b, a) for b, a in zip(before, tensors, strict=True)):
        raise ValueError(f"{_who(emitter)}.emit modified the step's tensors")


def check_plain_records(emitter: object, step: LayerStep) -> None:
    """Every record holds plain values (what the writers can serialise), never tensors."""
    for rec in emitter.emit(step):  # type: ignore[attr-defined]
        for name, value in record_values(rec).items():
            if isinstance(value, Tensor):
                raise ValueError(f"{type(rec).__name__}.{name} is a tensor, not a plain value")


def last_row_only(step: LayerStep) -> LayerStep:
    """The step as a pass that decodes only the last position would give it."""
    v = step.values
    return replace(step, tensors=step.tensors.last_only(),
                   values=RowValues(finite=v.finite[-1:], entropy=v.entropy[-1:],
                                    top_ids=v.top_ids[-1:], top_p=v.top_p[-1:]))


def check_last_rows_suffice(emitter: object, step: LayerStep) -> None:
    """A ``rows = "last"`` emitter gives the same records from the last row alone."""
    if getattr(emitter, "rows", None) != "last":
        return
    problem = f"{_who(emitter)} says rows = 'last' but reads other positions"
    full = list(emitter.emit(step))  # type: ignore[attr-defined]
    try:
        alone = list(emitter.emit(last_row_only(step)))  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - any failure on the last row alone is the finding
        raise ValueError(f"{problem} ({type(exc).__name__}: {exc})") from exc
    if alone != full:
        raise ValueError(problem)


EMITTER_CHECKS: tuple[Callable[[object, LayerStep], None], ...] = (
    check_emit_signature, check_rows, check_pure, check_step_untouched, check_plain_records,
    check_last_rows_suffice)


def check_emitter(emitter: object, step: LayerStep) -> list[Record]:
    """Run every emitter check on one step; return the records the emitter gives for it.

    Raises:
        TypeError: ``emitter`` does not have the contract's shape (``EMITTER_CONTRACT``).
        ValueError: ``emit`` breaks the contract's behaviour (impure, modifies the
            step, emits tensors, or reads rows its ``rows`` does not declare).
    """
    for check in EMITTER_CHECKS:
        check(emitter, step)
    return list(emitter.emit(step))  # type: ignore[attr-defined]


# --- lenses --------------------------------------------------------------------------


def check_lens_name(lens: Lens, resids: Tensor) -> None:
    """The lens has a non-empty ``name`` (its records' ``lens`` and its files' suffix)."""
    name = getattr(lens, "name", None)
    if not isinstance(name, str) or not name or "," in name or "/" in name:
        raise TypeError(f"{_who(lens)}.name is {name!r}: the Lens contract is {LENS_CONTRACT} "
                        "(a name without ',' or '/')")


def check_forward_shape(lens: Lens, resids: Tensor) -> None:
    """``forward`` maps (seq, d_model) to (seq, d_vocab), finite for finite input."""
    out = lens.forward(resids[-1], resids.shape[0] - 1)
    want = (resids.shape[1], lens.unembed.d_vocab)
    if tuple(out.shape) != want or not bool(torch.isfinite(out).all()):
        raise ValueError(f"{_who(lens)}.forward gave {tuple(out.shape)}, want finite {want}")


def check_decode_matches_forward(lens: Lens, resids: Tensor) -> None:
    """``decode`` of many layers in one matmul equals ``forward`` layer by layer."""
    layers = list(range(resids.shape[0]))
    many = lens.decode(resids, layers)
    for layer in layers:
        if not torch.allclose(many[layer], lens.forward(resids[layer], layer), rtol=1e-5,
                              atol=1e-6):
            raise ValueError(f"{_who(lens)}.decode differs from forward at layer {layer}")


def check_positions_independent(lens: Lens, resids: Tensor) -> None:
    """Decoding the last position alone gives that row of decoding them all.

    Passes rely on it to decode only the positions their outputs write.
    """
    for layer in range(resids.shape[0]):
        alone = lens.forward(resids[layer, -1:], layer)[0]
        if not torch.allclose(alone, lens.forward(resids[layer], layer)[-1], rtol=1e-5,
                              atol=1e-6):
            raise ValueError(f"{_who(lens)} decodes the last position differently alone "
                             f"(layer {layer}): positions must be independent")


def check_input_untouched(lens: Lens, resids: Tensor) -> None:
    """Decoding leaves the residuals as they were."""
    before = resids.clone()
    lens.decode(resids, list(range(resids.shape[0])))
    if not torch.equal(before, resids):
        raise ValueError(f"{_who(lens)} modified the residuals it decoded")


LENS_CHECKS: tuple[Callable[[Lens, Tensor], None], ...] = (
    check_lens_name, check_forward_shape, check_decode_matches_forward,
    check_positions_independent, check_input_untouched)


def check_lens(lens: Lens, resids: Tensor) -> None:
    """Run every lens check on (n_layers + 1, seq, d_model) residuals of one pass."""
    for check in LENS_CHECKS:
        check(lens, resids)
