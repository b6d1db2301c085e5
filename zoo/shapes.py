"""Models with the real configs' shapes and tiny widths: what a cluster runs, in laptop size.

    python -m zoo.shapes     # build them (seconds; cached) and print where they live

A Vicuna-7B-shaped Llama (Vicuna v1.5's config: rope theta, norm epsilon, 4,096
positions, SiLU MLP; 2 layers and a width of 64 instead of 32 x 4,096) with the zoo's
tokenizer and the Vicuna USER/ASSISTANT template, and a CLIP-L/14-336-shaped vision
tower (336 px, patch 14, so 576 image tokens, as LLaVA-1.5's; 2 layers, width 32).
Random weights: they exist to run the cluster's code paths (sequence lengths of 2,048,
576 image tokens, 336-px preprocessing) end to end, not to learn. A space file names
them like zoo sizes: `model_size: "vicuna-7b-tiny"`, `vision_tower: "clip-l14-336-tiny"`.
"""

from __future__ import annotations

from pathlib import Path

from zoo import cache

SHAPES_VERSION = 1
SEED = 0
# lmsys/vicuna-7b-v1.5's config.json, but 2 layers and a width of 64 (intermediate kept at its 2.69x ratio).
SHAPED_LLMS = {
    "vicuna-7b-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           intermediate_size=172, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False),
}
# openai/clip-vit-large-patch14-336's vision config, but 2 layers and a width of 32.
SHAPED_TOWERS = {
    "clip-l14-336-tiny": dict(image_size=336, patch_size=14, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=128, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
}


def shapes_dir() -> Path:
    return cache.cache_dir() / f"shapes-v{SHAPES_VERSION}-seed{SEED}"


def path_of(name: str) -> Path:
    """The checkpoint of a shaped LLM or tower (built on first use)."""
    if name not in SHAPED_LLMS and name not in SHAPED_TOWERS:
        raise KeyError(f"no shaped model {name!r} (known: {sorted(SHAPED_LLMS) + sorted(SHAPED_TOWERS)})")
    return ensure_shapes() / name


def build(out: Path, seed: int = SEED) -> None:
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM, PreTrainedTokenizerFast)

    from zoo import models

    tokenizer = PreTrainedTokenizerFast.from_pretrained(models.ensure_zoo() / "tokenizer")
    for name, shape in SHAPED_LLMS.items():
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
        LlamaForCausalLM(config).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    for name, shape in SHAPED_TOWERS.items():
        torch.manual_seed(seed)
        CLIPVisionModel(CLIPVisionConfig(**shape)).save_pretrained(out / name)
        size = shape["image_size"]  # CLIP's own preprocessing at 336: resize the short side, centre crop
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}) \
            .save_pretrained(out / name)


def ensure_shapes() -> Path:
    return cache.ensure(shapes_dir(), build)


if __name__ == "__main__":
    print(ensure_shapes())
