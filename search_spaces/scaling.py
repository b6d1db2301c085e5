"""The scaling paper's Table 3 on the zoo: model size x image resolution x data mixing, LoRA fixed at its best.

    python -m study.run search_spaces/scaling.py

Every combination runs once (a grid, not a search), so the study's table shows each
factor's effect: the paper saw larger LLMs help most, 336 px over 224 px add 2-3
points, and mixing language-only instructions into stage 2 add about 2 points while
keeping text skill (compare `text_score`). LoRA is held at the paper's best setting
(alpha = 2 x rank, a high learning rate; ours ~10x higher for ~1000x smaller models).
"""
from study.space import choice

NAME = "scaling"
SAMPLER = "grid"
NUM_SAMPLES = 12  # 3 sizes x 2 resolutions x 2 mixes
FIXED = {"method": "lora", "lora_rank": 16, "lora_alpha": 32, "lr": 3e-3,
         "stage1_steps": 150, "stage2_steps": 250, "batch_size": 32, "eval_samples": 300}
SPACE = {
    "model_size": choice(["0.3m", "1m", "3.6m"]),  # the zoo's three LLMs (~12x apart)
    "image_size": choice([32, 48]),                # the zoo tower at two resolutions: 224 vs 336 in miniature
    "mix_ratio": choice([0.0, 0.2]),               # with or without language-only data in stage 2
}
SMOKE = {"stage1_steps": 5, "stage2_steps": 10, "eval_samples": 32, "batch_size": 8}
