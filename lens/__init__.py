"""lens: a layer-by-layer logit-lens analysis harness for causal language models."""

from lens.config import Fact, Probe, RunConfig, default_probe
from lens.errors import LensError

__all__ = ["Fact", "LensError", "Probe", "RunConfig", "default_probe"]
__version__ = "0.1.0"
