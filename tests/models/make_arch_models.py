"""Build the architecture-conformance fixtures: one tiny random model per family.

Run once (``python tests/models/make_arch_models.py``); the directories under
``tests/models/arch/`` are committed. Each model is a few hundred KB: a shared
byte-level BPE tokenizer (real vocab + merges, so every family's tokenizer class
loads it the same way), d_model 32, 2 layers. Default initialisation (unit
norms, near-uniform heads) hides exactly the mistakes the suite exists to
catch, so norm weights and biases are randomised and the unembedding is
sharpened until the head's distribution is far from uniform.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
OUT = HERE / "arch"
sys.path.insert(0, str(HERE))
from make_tiny_models import TEXTS  # noqa: E402

SEED = 1212
VOCAB = 384
"""BPE merges stop when the corpus has no more pairs; the model's vocabulary is the tokenizer's."""
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": 2}
LLAMA_LIKE = {**COMMON, "num_key_value_heads": 2}
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama3": ("LlamaConfig", {**LLAMA_LIKE, "rope_theta": 500000.0, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**LLAMA_LIKE, "tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 8, "tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 15.0,
                                "attn_logit_softcapping": 50.0, "sliding_window": 16}),
    "gpt2": ("GPT2Config", {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
                            "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_neox": ("GPTNeoXConfig", {**COMMON, "use_parallel_residual": True, "rotary_pct": 0.5,
                                   "tie_word_embeddings": False}),
    "opt": ("OPTConfig", {**COMMON, "ffn_dim": 64, "word_embed_proj_dim": 32,
                          "do_layer_norm_before": True}),
    "opt_postnorm": ("OPTConfig", {**COMMON, "ffn_dim": 64, "word_embed_proj_dim": 32,
                                   "do_layer_norm_before": False}),
    "phi3": ("Phi3Config", {**LLAMA_LIKE, "tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {**LLAMA_LIKE, "tie_word_embeddings": False}),
    "cohere": ("CohereConfig", {**LLAMA_LIKE, "logit_scale": 0.5, "tie_word_embeddings": True}),
    "granite": ("GraniteConfig", {**LLAMA_LIKE, "logits_scaling": 4.0, "embedding_multiplier": 2.0,
                                  "residual_multiplier": 0.5, "attention_multiplier": 0.25,
                                  "tie_word_embeddings": False}),
}
"""Fixture name → (transformers config class, its arguments)."""


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the probe texts: any text tokenises, the probe's words whole."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=64)


def randomise(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """Every parameter from ``rng``: norms far from identity, a sharp unembedding."""
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if re.search(r"(norm|ln_\w+)\.weight$", name):
                values = 1.0 + 0.4 * rng.standard_normal(p.shape)
            elif re.search(r"(norm|ln_\w+)\.bias$", name):
                values = 0.5 * rng.standard_normal(p.shape)
            elif name.endswith("bias"):
                values = 0.05 * rng.standard_normal(p.shape)
            elif p is head:
                values = 1.2 * rng.standard_normal(p.shape)
            else:
                values = 0.25 * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(values.astype(np.float32)))


def main() -> int:
    tokenizer = make_tokenizer()
    if len(tokenizer) != VOCAB:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens; set VOCAB to that")
    for name, (config_class, kwargs) in FAMILIES.items():
        rng = np.random.default_rng([SEED, len(name)] + [ord(c) for c in name])
        config = getattr(transformers, config_class)(**kwargs)
        model = AutoModelForCausalLM.from_config(config)
        randomise(model, rng)
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "generation_config.json").unlink(missing_ok=True)
        size = sum(f.stat().st_size for f in out.iterdir()) // 1024
        print(f"wrote {out.relative_to(HERE)}: {sum(p.numel() for p in model.parameters())} "
              f"parameters, {size} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
