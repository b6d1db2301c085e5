"""What the laptop study builds once and caches: the model zoo, the synthetic world, and the cache discipline.

    python -m zoo                  # build both (once) and print where they live
    python -m zoo.world OUT_DIR    # write the synthetic world as a LLaVA-format dataset

The bottom layer: it imports nothing of the project's other packages (tests/test_layers.py).
"""

from zoo.cache import cache_dir
from zoo.models import (CHAT_TEMPLATE, IMAGE_SIZES, IMAGE_TOKEN, LLM_SIZES, SEED, ZOO_VERSION, ensure_world,
                        ensure_zoo, llm_path, tokenizer_path, vision_path, world_dir, zoo_dir)

__all__ = ["CHAT_TEMPLATE", "IMAGE_SIZES", "IMAGE_TOKEN", "LLM_SIZES", "SEED", "ZOO_VERSION", "cache_dir",
           "ensure_world", "ensure_zoo", "llm_path", "tokenizer_path", "vision_path", "world_dir", "zoo_dir"]
