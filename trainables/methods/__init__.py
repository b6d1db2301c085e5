"""The method registry: full, LoRA, QLoRA and MMA, each a small module over the stage tables."""

from trainables.methods import full, lora, mma, qlora
from trainables.methods.stages import (ADAPTER, FROZEN, FULL, LORA, PARTS, STAGE1, Method, apply_stage,
                                       check_stage, dir_mb, part_of)

METHODS: dict[str, Method] = {m.name: m for m in (full.METHOD, lora.METHOD, qlora.METHOD, mma.METHOD)}

__all__ = ["ADAPTER", "FROZEN", "FULL", "LORA", "METHODS", "PARTS", "STAGE1", "Method", "apply_stage",
           "check_stage", "dir_mb", "part_of"]
