"""What lens relies on in a model, checked at load time: a broken model is named as such.

Without these checks a broken checkpoint fails deep inside the analysis with a
message that blames lens (an index error, "unsupported normalisation"). Each
check raises ``LensError`` saying what is wrong with the model and what to do:

- ``check_config``: at least one layer (before any weight is read);
- ``check_loaded``: every tokenizer id has a row in the embedding, and no
  weight is entirely NaN/Inf, nor any normalisation weight partly (a NaN
  elsewhere is analysed and flagged per layer, ``diagnostics.non_finite``).

``reason`` turns a library's exception into one line that keeps its reason
(validation errors put it on the lines after the first).
"""

from __future__ import annotations

from typing import Any

import torch

from lens.errors import LensError

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
NORM_HINTS = ("norm", "ln_", "ln1", "ln2", "ln_f")
"""Parameter-name parts of normalisation modules (GPT-2 ``ln_1``, Llama ``input_layernorm``…)."""
_CHUNK = 1 << 24
MAX_REASON = 400
_BROKEN = "the checkpoint is damaged or incomplete: re-download or re-save the model"


def reason(exc: BaseException) -> str:
    """``Class: message`` on one line, every line of the message kept (cut at MAX_REASON)."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= MAX_REASON else line[:MAX_REASON - 1] + "…"


def check_config(model_id: str, hf_config: Any) -> None:
    """The config declares at least one layer."""
    for key in LAYER_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise LensError(f"{model_id} declares {key} = {value} in its config.json; a "
                                "causal LM has at least one layer: the model directory is broken")
            return


def check_loaded(model_id: str, tokenizer: Any, hf_model: Any) -> None:
    """Tokenizer ids fit the embedding; no weight is all NaN/Inf, no norm weight has any."""
    embeddings = hf_model.get_input_embeddings() if hf_model is not None else None
    if embeddings is not None and tokenizer is not None:
        # The base vocabulary, not len(tokenizer): special tokens added after training
        # may lie past the embedding and are never produced from text (tokenize checks).
        rows, n_ids = int(embeddings.weight.shape[0]), int(tokenizer.vocab_size)
        if n_ids > rows:
            raise LensError(f"the tokenizer of {model_id} has {n_ids} ids but its embedding only "
                            f"{rows} rows: the tokenizer does not belong to these weights; save "
                            "the model's own tokenizer beside them")
    for name, param in (hf_model.named_parameters() if hf_model is not None else ()):
        short = name.replace("._original_component", "")
        if not param.is_floating_point() or param.device.type == "meta":
            continue
        if not _any_finite(param):
            raise LensError(f"weight {short} of {model_id} is entirely NaN/Inf; {_BROKEN}")
        if any(h in short.lower() for h in NORM_HINTS) and not bool(torch.isfinite(param).all()):
            raise LensError(f"normalisation weight {short} of {model_id} holds NaN/Inf; {_BROKEN}")


def _any_finite(param: torch.Tensor) -> bool:
    """Whether any element is finite, reading chunk by chunk (usually only the first)."""
    flat = param.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        if bool(torch.isfinite(flat[start:start + _CHUNK]).any()):
            return True
    return flat.numel() == 0
