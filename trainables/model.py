"""Building a LLaVA from an LLM and a vision tower, and finding them.

Model ids resolve in one place: a zoo name ("1m") maps to the laptop zoo, anything
else is a Hugging Face id or a local path, loaded with `from_pretrained` exactly
the same way (no `trust_remote_code` unless the user sets MMSCALE_TRUST_REMOTE_CODE=1).
"""

from __future__ import annotations

import os

import torch

import zoo


def trust_remote_code() -> bool:
    return os.environ.get("MMSCALE_TRUST_REMOTE_CODE") == "1"


def llm_id(model_size: str) -> str:
    """Where an LLM loads from: a zoo size, a shaped model (zoo.shapes), else a Hugging Face id or path."""
    from zoo import shapes

    if model_size in zoo.LLM_SIZES:
        return str(zoo.llm_path(model_size))
    if model_size in shapes.SHAPED_LLMS:
        return str(shapes.path_of(model_size))
    return model_size


def vision_id(cfg) -> str:
    """Where the vision tower loads from: `vision_tower` (a shaped tower, an id or a path), else the zoo's at
    `image_size`."""
    from zoo import shapes

    if cfg.vision_tower in shapes.SHAPED_TOWERS:
        return str(shapes.path_of(cfg.vision_tower))
    if cfg.vision_tower:
        return cfg.vision_tower
    if cfg.image_size not in zoo.IMAGE_SIZES:
        raise ValueError(f"image_size={cfg.image_size}: the zoo has vision towers at {zoo.IMAGE_SIZES}")
    return str(zoo.vision_path(cfg.image_size))


def build_processor(cfg):
    """LlavaProcessor over the LLM's tokenizer and the tower's image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionConfig, LlavaProcessor

    trc = trust_remote_code()
    tokenizer = AutoTokenizer.from_pretrained(llm_id(cfg.model_size), trust_remote_code=trc)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if not tokenizer.chat_template:  # e.g. Vicuna v1.5 ships none: use its USER/ASSISTANT format
        from zoo import CHAT_TEMPLATE

        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    vision = vision_id(cfg)
    image_processor = AutoImageProcessor.from_pretrained(vision, trust_remote_code=trc)
    patch = CLIPVisionConfig.from_pretrained(vision).patch_size
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tokenizer.chat_template)


def num_image_tokens(processor) -> int:
    """Image tokens per image: one per patch, CLS dropped (LLaVA's 'default' strategy)."""
    size = processor.image_processor.crop_size["height"]
    return (size // processor.patch_size) ** 2


def image_tokens(cfg, processor) -> int:
    """Placeholder tokens per image for this trial: its method's count (MMA's neck uses a few), else
    one per vision patch as LLaVA (576 for CLIP-L/14 at 336 px)."""
    from trainables.methods import METHODS

    count = METHODS[cfg.method].image_tokens
    return count(processor, cfg) if count else num_image_tokens(processor)


def build_llava(cfg, processor, dtype=torch.float32):
    """A LlavaForConditionalGeneration from a pretrained LLM and vision tower, projector fresh (seeded)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel,
                              LlavaConfig, LlavaForConditionalGeneration)

    trc = trust_remote_code()
    text_config = AutoConfig.from_pretrained(llm_id(cfg.model_size), trust_remote_code=trc)
    vision_config = CLIPVisionConfig.from_pretrained(vision_id(cfg))
    tokenizer = processor.tokenizer
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=num_image_tokens(processor), projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config).to(dtype)
    llm = AutoModelForCausalLM.from_pretrained(llm_id(cfg.model_size), dtype=dtype, trust_remote_code=trc)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    tower = CLIPVisionModel.from_pretrained(vision_id(cfg), dtype=dtype)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_llava(path, cfg, quantization=None):
    """A saved LLaVA checkpoint (e.g. the stage-1 result) as the stage-2 starting model.

    fp32 weights: on GPU DeepSpeed's bf16 mode casts them; a quantized base keeps its
    4-bit linear layers and computes in the quantization config's dtype.
    """
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, quantization_config=quantization,
                                                         trust_remote_code=trust_remote_code())


def gathered_state(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); a collective under ZeRO-3.

    ZeRO-3 consolidation goes through DeepSpeed's own layer-by-layer gather to rank 0
    (what Accelerate's get_state_dict uses), so no rank ever holds two full copies.
    """
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in state.items()} if rank == 0 else None
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
