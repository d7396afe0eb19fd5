"""What ``bench.py`` needs besides the benchmark itself: the synthetic wide model, peak memory.

Kept apart so that every file in ``benchmarks/`` stays within 400 lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# --- the synthetic wide-vocabulary model ------------------------------------------------

def build_wide_model(dest: Path, *, layers: int, d_model: int, vocab: int, heads: int = 8,
                     intermediate: int = 1376, seed: int = 316) -> Path:
    """A random Llama-style model whose tokenizer covers the probe, padded to ``vocab`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(REPO / "tests" / "models"))
    from make_tiny_models import vocabulary

    words = vocabulary()
    if vocab < len(words):
        raise SystemExit(f"--wide-vocab must be at least {len(words)}")
    pieces = words + [f"x{i:06d}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=256)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    hf_logging.disable_progress_bar()
    model.save_pretrained(dest, safe_serialization=True)
    hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(dest)
    (dest / "generation_config.json").unlink(missing_ok=True)
    return dest


# --- waiting for the device ---------------------------------------------------------------

def finish(device: torch.device | None = None) -> None:
    """Wait for what CUDA has queued on ``device`` (default: the current one), so that a stage
    is timed by its work, not its launch: CUDA kernels run asynchronously. Nothing on a CPU."""
    if (device is None or device.type == "cuda") and torch.cuda.is_available() \
            and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


# --- memory -------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_beyond(fn: Callable[[], object], device: torch.device | None = None) -> tuple[int, str]:
    """Peak resident bytes that ``fn()`` adds to the process, and how it was measured.

    Frees what the allocator holds, resets the kernel's RSS high-water mark
    (``/proc/self/clear_refs``), runs ``fn`` and reads ``VmHWM``. Without
    ``clear_refs``, a thread samples ``VmRSS`` every millisecond instead. On a
    CUDA ``device`` the logits live in GPU memory, so the peak is the caching
    allocator's high-water mark there instead.
    """
    gc.collect()
    if device is not None and device.type == "cuda":
        finish(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        finish(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) * 1024, "VmHWM"
    except OSError:
        pass
    base = _status_kb("VmRSS")
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_kb("VmRSS"))
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (peak[0] - base) * 1024, "VmRSS sampled every 1 ms"
