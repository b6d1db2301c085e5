"""QLoRA: LoRA plus one setting, the base LLM in 4-bit NF4 (bitsandbytes, double quantization).

The vision tower, the projector and the LM head stay unquantized, and the projector
trains as in LoRA. Under ZeRO-3 the packed 4-bit weights are stored in the compute dtype
(`bnb_4bit_quant_storage`, PEFT's documented route for DeepSpeed ZeRO-3 and FSDP) so that
DeepSpeed partitions and gathers them like any other frozen weight; their quantization
state (absmax, double-quantization constants) stays whole on every rank. Under ZeRO-2 they
keep bitsandbytes' default uint8 storage; the numbers are the same either way. A
bitsandbytes too old for quant_storage is refused for ZeRO-3 by name (Method.problem).
"""

from __future__ import annotations

import dataclasses

from trainables.methods import lora

# Parts kept in full precision: only the LLM's linear layers are quantized (the QLoRA recipe).
# transformers 5 matches these from the start of the full module name or as a suffix,
# so a bare "vision_tower" would not match "model.vision_tower.encoder...": use regexes.
KEEP_UNQUANTIZED = [r".*vision_tower", r".*multi_modal_projector", "lm_head"]


def compute_dtype(cfg):
    import torch

    return torch.bfloat16 if cfg.use_gpu else torch.float32


def quantization_config(cfg):
    """The one place that decides whether and how a trial's base model is quantized (None: not at all)."""
    from transformers import BitsAndBytesConfig

    from trainables.methods import METHODS

    if not METHODS[cfg.method].quantize_base:
        return None
    import torch

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(cfg), llm_int8_skip_modules=KEEP_UNQUANTIZED,
                              bnb_4bit_quant_storage=compute_dtype(cfg) if cfg.zero_stage == 3 else torch.uint8)


def exact_cpu_kernels(model):
    """Turn off bitsandbytes' CPU inference fast path on every 4-bit layer.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference and
    computes in bf16: evaluation would then differ from training's numbers, and the
    repacking fails outright on widths that are not a multiple of its block size (the
    zoo's 96-wide LLM). Training never takes that path; evaluation should not either.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load(base, cfg):
    from trainables.model import load_llava

    return exact_cpu_kernels(load_llava(base, cfg, quantization_config(cfg)))


def wrap(model, cfg):
    from peft import prepare_model_for_kbit_training

    # Norms to fp32 and inputs ready for k-bit training; gradient checkpointing stays the user's choice.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.wrap(model, cfg)


# The model card's snippet: the adapter goes on the 4-bit base it trained on, quantized as in training.
HOW_TO_LOAD = """
from peft import PeftModel
from transformers import AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration
quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               llm_int8_skip_modules=%r)
model = LlavaForConditionalGeneration.from_pretrained("{base}", quantization_config=quantized)
model = PeftModel.from_pretrained(model, "{artifact}")
processor = AutoProcessor.from_pretrained("{base}")
""" % KEEP_UNQUANTIZED

METHOD = dataclasses.replace(lora.METHOD, name="qlora", load=load, wrap=wrap, quantize_base=True,
                             description="LoRA over a 4-bit NF4 base (bitsandbytes, double quantization)",
                             how_to_load=HOW_TO_LOAD)
