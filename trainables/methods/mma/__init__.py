"""MMA (LaVIN's Mixture-of-Modality Adaptation): routed adapters in every vision and LLM block, a visual neck.

Single-stage: it starts from the assembled LLaVA (its projector stays unused and
frozen); only the MM-Adapters and the neck (with the modality tokens) train, a few
tens of thousands of parameters on the zoo, ~3.8M at 7B in the paper. Split as PEFT's
tuners: config.py (MMAConfig), layer.py (MMAdapter, VisualNeck), model.py (MMAModel).
"""

from __future__ import annotations

from trainables.methods.mma.config import MMAConfig
from trainables.methods.mma.model import MMAModel
from trainables.methods.stages import ADAPTER, FROZEN, FULL, Method, load_base, save_adapter


def wrap(model, cfg) -> MMAModel:
    return MMAModel(model, MMAConfig.from_trial(cfg))


def image_tokens(processor, cfg) -> int:
    """Placeholders per image: the image-modality token, then one per selected vision layer."""
    from transformers import CLIPVisionConfig

    from trainables.model import vision_id

    layers = CLIPVisionConfig.from_pretrained(vision_id(cfg)).num_hidden_layers
    return 1 + len(MMAConfig.from_trial(cfg).neck_layers(layers))


METHOD = Method("mma", {"vision_tower": ADAPTER, "projector": FROZEN, "neck": FULL, "llm": ADAPTER}, "mma",
                load=load_base, save=save_adapter, wrap=wrap, image_tokens=image_tokens, two_stage=False)

__all__ = ["METHOD", "MMAConfig", "MMAModel", "image_tokens", "wrap"]
