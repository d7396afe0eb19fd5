"""The lens registry: ``--lenses`` names → resolvers.

Adding a lens is a ``Lens`` subclass plus one line in ``LENSES``: a lens that
needs nothing fitted registers ``TheLens.resolve``; a fitted one registers
``fitted(module, function)``, a resolver of ``resolve_prism``'s shape
(``function(config, *, name=…, d_model=…, unembed=…, norms=…) -> object with
.lens and .summary``) imported only when the lens is chosen. Its
``auto|on|off`` mode lives in the run config (``--prism``, ``--tuned``): a
fitted lens without usable artifacts is skipped, and its summary says why.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lens.errors import LensError
from lens.lenses.base import LensParts, Resolution
from lens.lenses.logit import LogitLens
from lens.lenses.raw import RawLens

if TYPE_CHECKING:
    from lens.config import RunConfig

Resolver = Callable[[LensParts], Resolution]


def fitted(module: str, function: str) -> Resolver:
    """The resolver ``module.function``, imported on first use and given the parts it names.

    The function takes the run config first, then keyword arguments among
    ``LensParts``' fields and properties (``name``, ``model``, ``d_model``,
    ``n_layers``, ``unembed``, ``norms``); it is passed exactly those it declares.
    """
    def resolve(parts: LensParts) -> Resolution:
        target = getattr(importlib.import_module(module), function)
        wanted = [p for p in inspect.signature(target).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY]
        return target(parts.config, **{p.name: getattr(parts, p.name) for p in wanted
                                        if hasattr(parts, p.name)})

    def precheck(config: RunConfig, name: str) -> None:
        """Its module's ``precheck(config, name)``: ``on`` fails before the model loads."""
        getattr(importlib.import_module(module), "precheck", lambda *_: None)(config, name)

    resolve.__qualname__ = f"fitted({module}.{function})"
    resolve.precheck = precheck  # type: ignore[attr-defined]
    return resolve


LENSES: dict[str, Resolver] = {
    "logit": LogitLens.resolve,
    "tuned": fitted("lens.tuned", "resolve_tuned"),
    "prism": fitted("lens.prism", "resolve_prism"),
    "raw": RawLens.resolve,
}
"""Every sidecar lens ``--lenses`` can name, in the order the README lists them."""

PRIMARY = "norm"
"""The primary lens, always decoded; its files never change (not a sidecar)."""


def check_lens_names(names: Sequence[str]) -> None:
    """Refuse unknown, duplicate or primary names with one line naming the choices."""
    known = ", ".join(LENSES)
    for name in names:
        if name == PRIMARY:
            raise LensError(f"--lenses: {PRIMARY!r} is the primary lens and always runs; "
                            f"name only sidecar lenses ({known})")
        if name not in LENSES:
            raise LensError(f"--lenses: unknown lens {name!r}; choose from {known}")
    if len(set(names)) != len(names):
        raise LensError(f"--lenses names a lens twice: {','.join(names)}")


def precheck_lenses(config: RunConfig, name: str) -> None:
    """Before the model loads: refuse what the chosen fitted lenses can tell without it."""
    for lens in config.lenses:
        check = getattr(LENSES[lens], "precheck", None)
        if check is not None:
            check(config, name)


def resolve_lenses(names: Sequence[str], parts: LensParts) -> dict[str, Resolution]:
    """Resolve the chosen sidecar lenses in the given order (settled before any pass runs)."""
    check_lens_names(names)
    resolved = {name: LENSES[name](parts) for name in names}
    for name, res in resolved.items():
        if res.lens is not None and res.lens.name != name:
            raise ValueError(f"the resolver registered as {name!r} built a {res.lens.name!r} lens")
    return resolved

