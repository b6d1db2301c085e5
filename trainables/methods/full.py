"""Full fine-tuning: stage 2 trains the whole LLM and the projector (the paper's strongest, costliest row).

Runs under ZeRO-2 or ZeRO-3; the artifact `model/` is a `save_pretrained` LLaVA
checkpoint (ZeRO-3 shards gathered on save) that `from_pretrained` and lmms-eval load.
"""

from __future__ import annotations

import shutil

from trainables.methods.stages import FROZEN, FULL, Method, load_base

STAGE2 = {"vision_tower": FROZEN, "projector": FULL, "llm": FULL}


def save(ctx, engine, out) -> None:
    from trainables.model import gathered_state

    state = gathered_state(engine, ctx.cfg.zero_stage, ctx.rank)  # a collective under ZeRO-3
    if ctx.rank == 0:
        engine.module.save_pretrained(out, state_dict=state)
        ctx.processor.save_pretrained(out)


def export(artifact, cfg, out, base) -> None:
    """The artifact is already a whole checkpoint: copied as it is."""
    shutil.copytree(artifact, out, dirs_exist_ok=True)


METHOD = Method("full", STAGE2, "model", load=load_base, save=save, export=export, fields=("projector_lr",),
                description="every LLM weight and the projector",
                how_to_load="""
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("{artifact}")
processor = AutoProcessor.from_pretrained("{artifact}")
""")
