"""Tuning methods as data: which part of LLaVA is frozen, LoRA-tuned or fully trained per stage.

A method is a small table (STYLE.md, "stages are data"). `apply_stage` makes the
model match a table, asserts that it does, and returns the trainable-parameter
count per part, which the worker logs. Nothing else touches `requires_grad`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FROZEN, LORA, FULL = "frozen", "lora", "full"
PARTS = ("vision_tower", "projector", "llm")
# LLaVA's stage 1 (feature alignment): only the projector learns, on captions.
STAGE1 = {"vision_tower": FROZEN, "projector": FULL, "llm": FROZEN}
# The LLM's linear layers that LoRA adapts (all of them, as in the QLoRA/LLaVA-LoRA recipes).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Method:
    name: str
    stage2: dict[str, str]
    two_stage: bool = True


METHODS = {
    # LLaVA-LoRA: LoRA on every LLM linear layer; the projector keeps training at its own lr.
    "lora": Method("lora", {"vision_tower": FROZEN, "projector": FULL, "llm": LORA}),
}


def part_of(param_name: str) -> str:
    """Which LLaVA part a parameter belongs to (names as transformers 5 / PEFT write them)."""
    if "vision_tower." in param_name:
        return "vision_tower"
    if "multi_modal_projector." in param_name:
        return "projector"
    if "language_model." in param_name or "lm_head." in param_name:
        return "llm"
    raise ValueError(f"parameter {param_name!r} belongs to no known LLaVA part")


def lora_config(cfg):
    """The one place our names meet PEFT's (lora_rank -> r)."""
    from peft import LoraConfig

    targets = "|".join(LORA_TARGETS)
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=rf".*language_model\..*\.({targets})",
        modules_to_save=["multi_modal_projector"],
        bias="none",
    )


def apply_stage(model: torch.nn.Module, table: dict[str, str], cfg=None) -> tuple[torch.nn.Module, dict[str, int]]:
    """Freeze / wrap `model` as `table` says; return (model, trainable params per part)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if LORA in table.values():
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))  # marks LoRA weights and the projector copy trainable
    for name, p in model.named_parameters():
        mode = table[part_of(name)]
        if mode == FULL and "original_module" not in name:
            p.requires_grad_(True)
    return model, check_stage(model, table)


def check_stage(model: torch.nn.Module, table: dict[str, str]) -> dict[str, int]:
    """Assert the model trains exactly what `table` says; return trainable counts per part."""
    counts = {part: 0 for part in PARTS}
    for name, p in model.named_parameters():
        part, mode = part_of(name), table[part_of(name)]
        if p.requires_grad:
            counts[part] += p.numel()
            ok = mode == FULL or (mode == LORA and "lora_" in name)
            assert ok, f"{name} trains but {part} is {mode} in this stage"
        elif mode == FULL:
            assert "original_module" in name, f"{name} is frozen but {part} is fully trained in this stage"
    for part, mode in table.items():
        assert (counts[part] > 0) == (mode != FROZEN), f"{part} should be {mode}, trains {counts[part]} params"
    return counts
