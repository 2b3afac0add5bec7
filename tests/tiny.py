"""Tiny random models built from configs, one per supported architecture, with a tiny tokenizer."""

from __future__ import annotations

from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from steer.models import ModelHandle, from_pretrained_model

VOCAB = 384
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the moon.",
    "How do I bake bread at home? Use flour, water, salt and yeast.",
    "The knight drew her sword; the dragon laughed and breathed fire.",
    "I'm sorry, but I can't help with that request.",
    "Sure! Here is a story about a brave little robot who loved the stars.",
] * 20


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    fast.chat_template = CHATML
    return fast


def _common(**extra):  # type: ignore[no-untyped-def]
    tokenizer = tiny_tokenizer()
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def tiny_config(architecture: str):  # type: ignore[no-untyped-def]
    if architecture == "llama":
        return LlamaConfig(**_common())
    if architecture == "mistral":
        return MistralConfig(**_common(sliding_window=None))
    if architecture == "qwen2":
        return Qwen2Config(**_common())
    if architecture == "gemma2":
        # A small sliding window so the sliding-window cache paths are exercised.
        return Gemma2Config(**_common(head_dim=16, sliding_window=8))
    if architecture == "gemma3_text":
        return Gemma3TextConfig(**_common(head_dim=16, sliding_window=8))
    # MoE: 4 experts, 2 per token, so routing picks a subset and the weights differ per token
    if architecture == "mixtral":
        return MixtralConfig(
            **_common(sliding_window=None, num_local_experts=4, num_experts_per_tok=2)
        )
    if architecture == "qwen2_moe":
        # a shared expert, and a dense MLP in layer 1 (mlp_only_layers) as in some real configs
        return Qwen2MoeConfig(
            **_common(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=48,
                mlp_only_layers=[1],
            )
        )
    if architecture == "qwen3_moe":
        return Qwen3MoeConfig(
            **_common(
                head_dim=16,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                norm_topk_prob=True,
            )
        )
    raise KeyError(architecture)


ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "gemma3_text")
#: mixture-of-experts families; kept out of ``ARCHITECTURES`` (and the ``tiny`` fixture that the
#: whole suite runs on) because their per-expert loops make every forward pass slower
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")


#: vLLM's CPU attention has kernels for head sizes of 32 and up, not the 16 of the tiny configs
VLLM_SIZES = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
}


def tiny_handle(architecture: str, seed: int = 0, **sizes: int) -> ModelHandle:
    """``sizes`` override config fields (e.g. :data:`VLLM_SIZES`)."""
    torch.manual_seed(seed)
    config = tiny_config(architecture)
    for name, value in sizes.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and small weights: scale up so outputs are not flat.
    # (ndim 3: the stacked experts of MoE blocks)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0, 0.2)
    return from_pretrained_model(model, tiny_tokenizer(), name=f"tiny-{architecture}")
