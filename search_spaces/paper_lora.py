"""LoRA's learning rate and alpha, as the scaling paper varies them (Table 4's LoRA rows), over 3 seeds.

    python -m study.run search_spaces/paper_lora.py

Lu et al. 2023 find LoRA sensitive to both: alpha = 2 x rank with a high learning rate
works; a 10x lower rate, or alpha well below the rank, is clearly worse. Here: LoRA
rank 64 on the zoo's `1m` LLM, lr 3e-3 or 3e-4 x alpha = 2 x rank or rank / 4, each
configuration at 3 seeds (12 trials). docs/REPORT.md pools the three paper studies' trials: direction 4
comes from this one (its lr 3e-3, alpha = 2 x rank twins also from paper_table4).
"""
from study.space import alpha_per_rank, choice

NAME = "paper_lora"
SAMPLER = "grid"
SEEDS = 3
NUM_SAMPLES = 4  # 2 learning rates x 2 alphas, each at 3 seeds: 12 trials
FIXED = {"method": "lora", "model_size": "1m", "lora_rank": 64, "mix_ratio": 0.2,
         "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300}
SPACE = {
    "lr": choice([3e-3, 3e-4]),
    "lora_alpha": alpha_per_rank([2, 0.25]),  # alpha = 2 x rank (the paper's best) or rank / 4
}
SMOKE = {"stage1_steps": 5, "stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
