"""LoRA (LLaVA-LoRA): PEFT LoRA on every LLM linear layer; the projector keeps training at its own lr.

The scaling paper's finding: rank barely matters from 8 to 64 once alpha = 2 x rank
and the learning rate is high (1e-4 at 7B); the adapter is MBs where a full
checkpoint is GBs.
"""

from __future__ import annotations

from trainables.methods.stages import FROZEN, FULL, LORA, Method, load_base, recorded_base, save_adapter

# The LLM's linear layers that LoRA adapts (all of them, as in the QLoRA / LLaVA-LoRA recipes).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGE2 = {"vision_tower": FROZEN, "projector": FULL, "llm": LORA}


def lora_config(cfg, targets: tuple[str, ...] = TARGETS):
    """The one place our names meet PEFT's (lora_rank -> r)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=rf".*language_model\..*\.({'|'.join(targets)})",
        modules_to_save=["multi_modal_projector"],  # saved whole in the adapter, as LLaVA-LoRA does
        bias="none",
    )


def wrap(model, cfg, targets: tuple[str, ...] = TARGETS):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg, targets))  # marks LoRA weights and the projector copy trainable


def export(adapter, cfg, out, base) -> None:
    """The trained LLaVA with its LoRA merged into the base (QLoRA: into the dequantized 4-bit base it
    trained on, so the export computes what the trial evaluated), with the base's processor."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from trainables.methods.qlora import quantization_config
    from trainables.model import load_llava

    quantization = quantization_config(cfg)
    model = load_llava(base, cfg.replace(use_gpu=False), quantization)
    if quantization is not None:
        model = model.dequantize()  # NF4 -> fp32, exactly the weights the adapter was trained against
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)


# The model card's snippet (trainables.model_card): stock transformers + PEFT, nothing of ours.
HOW_TO_LOAD = """
from peft import PeftModel
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("{base}")
model = PeftModel.from_pretrained(model, "{artifact}")  # or .merge_and_unload() for a plain LLaVA
processor = AutoProcessor.from_pretrained("{base}")
"""

# Fields every LoRA-style method reads (the alpha multiplier, alpha_per_rank, is logged beside lora_alpha).
FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "projector_lr")
METHOD = Method("lora", STAGE2, "adapter", load=load_base, save=save_adapter, wrap=wrap, export=export,
                base_of=recorded_base("adapter_config.json"), fields=FIELDS,
                label_fields=(("lora_rank", "r{:.0f}"),),
                description="PEFT LoRA on every LLM linear layer + the projector at its own lr",
                library="peft", how_to_load=HOW_TO_LOAD)
