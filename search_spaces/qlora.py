"""QLoRA: LoRA over a 4-bit NF4 base LLM (bitsandbytes, double quantization), projector in full precision.

    python -m study.run search_spaces/qlora.py

The scaling paper found QLoRA close to LoRA at the same rank and learning rate, at a
fraction of the memory. Its LoRA anchors hold here: alpha = 2 x rank (fixed, the
best it found), rank 8 to 64, lr 1e-4 at 7B, which for our ~1000x smaller zoo
models sits about 10x higher. ZeRO-2 here (one rank per trial on a laptop); on a cluster, zero_stage 3
shards the 4-bit base too (stored in the compute dtype: trainables/methods/qlora.py).
"""
from study.space import choice, loguniform, alpha_per_rank

NAME = "qlora"
NUM_SAMPLES = 6
FIXED = {"method": "qlora", "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300,
         "zero_stage": 2}
SPACE = {
    "model_size": choice(["0.3m", "1m", "3.6m"]),
    "lora_rank": choice([8, 16, 32, 64]),
    "lora_alpha": alpha_per_rank(choice([2])),
    "lr": loguniform(3e-4, 1e-2),
}
SMOKE = {"stage1_steps": 5, "stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
