"""The cluster's shapes on a laptop: a CLIP-L/14-336-shaped tower and a Vicuna-7B-shaped Llama (zoo.shapes).

    python -m zoo.llava_like /tmp/llava-like --records 2000
    python -m study.run search_spaces/cluster_shapes.py --data /tmp/llava-like

Everything a real LLaVA-1.5 LoRA study moves through the data path is here at full size:
336-px images of several aspect ratios padded to squares, 576 image tokens per image, the
Vicuna template, long multi-turn answers, sequences up to 2,048 tokens; only the models'
widths and depths are tiny (random weights: scores mean nothing, the run is the check).
"""

from study.space import alpha_per_rank, choice, loguniform

NAME = "cluster_shapes"
NUM_SAMPLES = 4
FIXED = {
    "method": "lora",
    "model_size": "vicuna-7b-tiny",          # lmsys/vicuna-7b-v1.5's shape, 2 layers, width 64
    "vision_tower": "clip-l14-336-tiny",     # openai/clip-vit-large-patch14-336's shape: 576 image tokens
    "image_size": 336,
    "max_length": 2048,                      # LLaVA-1.5's model_max_length
    "batch_size": 8, "stage1_steps": 20, "stage2_steps": 40,
    "eval_samples": 32, "max_new_tokens": 16,
}
SPACE = {
    "lora_rank": choice([8, 64]),                 # the paper's range: rank barely matters once alpha = 2 x rank
    "lora_alpha": alpha_per_rank(choice([2])),
    "lr": loguniform(5e-5, 2e-4),                 # LLaVA-1.5's LoRA lr is 2e-4 at 7B
}
SMOKE = {"stage1_steps": 2, "stage2_steps": 3, "batch_size": 2, "eval_samples": 4, "max_new_tokens": 4,
         "checkpoint_every": 0}
