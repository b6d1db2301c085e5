"""LoRA (LLaVA-LoRA): PEFT LoRA on every LLM linear layer; the projector keeps training at its own lr.

The scaling paper's finding: rank barely matters from 8 to 64 once alpha = 2 x rank
and the learning rate is high (1e-4 at 7B); the adapter is MBs where a full
checkpoint is GBs.
"""

from __future__ import annotations

from trainables.methods.stages import FROZEN, FULL, LORA, Method, load_base, save_adapter

# The LLM's linear layers that LoRA adapts (all of them, as in the QLoRA / LLaVA-LoRA recipes).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGE2 = {"vision_tower": FROZEN, "projector": FULL, "llm": LORA}


def lora_config(cfg):
    """The one place our names meet PEFT's (lora_rank -> r)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=rf".*language_model\..*\.({'|'.join(TARGETS)})",
        modules_to_save=["multi_modal_projector"],  # saved whole in the adapter, as LLaVA-LoRA does
        bias="none",
    )


def wrap(model, cfg):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))  # marks LoRA weights and the projector copy trainable


METHOD = Method("lora", STAGE2, "adapter", load=load_base, save=save_adapter, wrap=wrap)
