"""Every method at the same budget: the scaling paper's Table 4 (full vs LoRA vs QLoRA) plus LaVIN's MMA.

    python -m study.run search_spaces/methods.py

A grid, so each method gets the same two learning rates on the same LLM and data:
the papers' anchors scaled to the zoo (full fine-tuning wants the smaller step, the
adapters the larger one). LoRA and QLoRA use the paper's best alpha = 2 x rank;
every method mixes 20% language-only samples into its instruction data (LaVIN's
recipe, and the scaling paper found it helps), so the comparison is about the method.
"""
from study.space import choice

NAME = "methods"
SAMPLER = "grid"
NUM_SAMPLES = 8  # 4 methods x 2 learning rates
FIXED = {"model_size": "1m", "lora_rank": 16, "lora_alpha": 32, "mix_ratio": 0.2, "neck_every": 1,
         "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300}
SPACE = {
    "method": choice(["full", "lora", "qlora", "mma"]),
    "lr": choice([1e-3, 3e-3]),
}
SMOKE = {"stage1_steps": 5, "stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
