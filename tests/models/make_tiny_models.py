"""Build the tiny GPT-2-style and Llama-style models the tests and goldens use.

Run once (``python tests/models/make_tiny_models.py``); the output directories
are committed, so goldens never depend on the RNG stream of a torch version.
Weights are drawn from a ``numpy`` generator with a fixed seed and stored in
float32 safetensors; the probe's words are all in the word-level vocabulary,
with GPT-2-style byte-level pieces (a leading space is ``Ġ``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

HERE = Path(__file__).resolve().parent
SEED = 316

TEXTS = [
    "Give the city name only, plain text. The capital of Germany is called simply Berlin",
    "Give the city name only, plain text. The capital of France is called simply Paris",
    "Give the country name only, plain text. Berlin is the capital of Germany",
    "Germany's capital city is called simply Berlin",
    "The capital city of Germany is named simply",
    "Germany has its capital at the city called simply",
    "In Germany the capital city is known as",
    "In Germany, the capital city is known as",
    "Answer word Answer: Rome Madrid Vienna Tokyo London Europe",
]
# Awkward token texts that must survive the CSV writers.
ODD = ['"', '\\', "\u00e9t\u00e9", "\r", "a,b", "\n"]


def vocabulary() -> list[str]:
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pieces: list[str] = []
    for text in TEXTS:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in pieces:
                pieces.append(piece)
    for text in ODD:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in pieces:
                pieces.append(piece)
    for word in list(pieces):
        if not word.startswith("\u0120") and re.fullmatch(r"[A-Za-z]+", word):
            spaced = "\u0120" + word
            if spaced not in pieces:
                pieces.append(spaced)
    return ["<unk>", "<s>", "</s>"] + pieces


def make_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=64,
    )


def fill(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """Overwrite every parameter from ``rng`` (norm scales near 1, biases small)."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or re.search(r"ln_\w+\.weight$", name):
                values = 1.0 + 0.2 * rng.standard_normal(p.shape)
            elif name.endswith("bias"):
                values = 0.05 * rng.standard_normal(p.shape)
            else:
                values = 0.3 * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(values.astype(np.float32)))


def save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for junk in ("generation_config.json",):
        (out / junk).unlink(missing_ok=True)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters")


def main() -> int:
    rng = np.random.default_rng(SEED)
    n_vocab = len(vocabulary())
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=n_vocab, n_positions=64, n_embd=32, n_layer=4, n_head=4,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        )
    )
    fill(gpt2, rng)
    save(gpt2, make_tokenizer(bos=False), HERE / "tiny-gpt2")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
    )
    fill(llama, rng)
    save(llama, make_tokenizer(bos=True), HERE / "tiny-llama")
    return 0


if __name__ == "__main__":
    sys.exit(main())
