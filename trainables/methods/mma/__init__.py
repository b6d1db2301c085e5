"""MMA (LaVIN's Mixture-of-Modality Adaptation): routed adapters in every vision and LLM block, a visual neck.

Single-stage: it starts from the assembled LLaVA (its projector stays unused and
frozen); only the MM-Adapters and the neck (with the modality tokens) train, a few
tens of thousands of parameters on the zoo, ~3.8M at 7B in the paper. Split as PEFT's
tuners: config.py (MMAConfig), layer.py (MMAdapter, VisualNeck), model.py (MMAModel).
"""

from __future__ import annotations

import json
import shutil

from trainables.methods.mma.config import CONFIG_NAME, MMAConfig
from trainables.methods.stages import ADAPTER, FROZEN, FULL, Method, load_base, recorded_base, save_adapter


def wrap(model, cfg):
    from trainables.methods.mma.model import MMAModel

    return MMAModel(model, MMAConfig.from_trial(cfg))


def image_tokens(processor, cfg) -> int:
    """Placeholders per image: the image-modality token, then one per selected vision layer."""
    from transformers import CLIPVisionConfig

    from trainables.model import vision_id

    layers = CLIPVisionConfig.from_pretrained(vision_id(cfg)).num_hidden_layers
    return 1 + len(MMAConfig.from_trial(cfg).neck_layers(layers))


def export(artifact, cfg, out, base) -> None:
    """No stock class knows LaVIN's adapters: the base LLaVA is written with `mma/` beside it, loaded by
    `MMAModel.from_pretrained(out / "mma", base=out)`; the base path is made relative so the folder moves whole."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(base).save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    shutil.copytree(artifact, out / "mma")
    conf = json.loads((out / "mma" / CONFIG_NAME).read_text())
    conf["base_model_name_or_path"] = ".."
    (out / "mma" / CONFIG_NAME).write_text(json.dumps(conf, indent=2))


def __getattr__(name: str):
    if name == "MMAModel":  # torch is imported only by whoever builds or loads the model
        from trainables.methods.mma.model import MMAModel

        return MMAModel
    raise AttributeError(name)


METHOD = Method("mma", {"vision_tower": ADAPTER, "projector": FROZEN, "neck": FULL, "llm": ADAPTER}, "mma",
                load=load_base, save=save_adapter, wrap=wrap, export=export, base_of=recorded_base(CONFIG_NAME),
                image_tokens=image_tokens, two_stage=False,
                fields=("adapter_dim", "router_temperature", "neck_dim", "neck_every"),
                label_fields=(("adapter_dim", "d{:.0f}"),),
                description="LaVIN's routed MM-Adapters in every vision and LLM block + a visual neck",
                how_to_load="""
# No stock class knows LaVIN's MM-Adapters: this needs mmscale (pip install -e . in its repository).
from trainables.methods.mma.model import MMAModel
model = MMAModel.from_pretrained("{artifact}", base="{base}")
# or `python -m study.export RUN_ID --out DIR`: the base LLaVA with mma/ beside it, one folder that moves whole
""")

__all__ = ["METHOD", "MMAConfig", "MMAModel", "export", "image_tokens", "wrap"]
