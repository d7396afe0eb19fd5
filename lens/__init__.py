"""lens: a layer-by-layer logit-lens analysis harness for causal language models."""

from lens.config import Fact, Probe, RunConfig, default_probe
from lens.errors import LensError
from lens.probe import load_probe

__all__ = ["Fact", "LensError", "Probe", "RunConfig", "default_probe", "load_probe"]
__version__ = "0.1.0"
