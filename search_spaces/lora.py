"""The default study: LoRA visual instruction tuning across model sizes, ranks, alphas and learning rates.

    python -m study.run search_spaces/lora.py

The scaling paper's LoRA findings are the anchors: alpha = 2 x rank with a high
learning rate (1e-4 at 7B-65B) works best, and rank barely matters from 8 to 64.
Our zoo models are ~1000x smaller than 7B, and tiny models want larger steps, so
the learning-rate range sits about 10x higher and spans two decades.
"""
from study.space import choice, loguniform, alpha_per_rank

NAME = "lora"
NUM_SAMPLES = 10  # about 11 minutes on 2 CPU cores, 2 trials at a time
FIXED = {"method": "lora", "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300}
SPACE = {
    "model_size": choice(["0.3m", "1m", "3.6m"]),  # the zoo's three sizes (~12x apart), like 7B/13B/33B/65B
    "lora_rank": choice([8, 16, 32, 64]),          # the paper's rank range
    "lora_alpha": alpha_per_rank(choice([0.5, 1, 2, 4])),  # alpha / rank; the paper's best is 2
    "lr": loguniform(1e-4, 1e-2),
}
# --smoke: the smallest budget that still runs both stages, evaluation and logging.
SMOKE = {"stage1_steps": 5, "stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
