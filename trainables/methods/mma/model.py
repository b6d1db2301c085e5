"""MMAModel: a LLaVA with an MM-Adapter before attention in every vision and LLM block, and a visual neck.

A drop-in for the LLaVA in the worker: `forward(input_ids, attention_mask, labels,
pixel_values)` for training, `generate` returning the prompt and the new tokens,
`save_pretrained` / `from_pretrained` for its weights alone.

Adapters are injected as in PEFT's `tuners/poly`: each is a child `mma_adapter` of a
block's `self_attn` (so names say which part it adapts) and runs in a forward pre-hook
on `self_attn`, i.e. on the output of the block's pre-attention norm, as LaVIN's
`attention(adapter(attention_norm(x)))`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from trainables.methods.mma.config import MMAConfig
from trainables.methods.mma.layer import MMAdapter, VisualNeck

WEIGHTS_NAME = "adapter_model.safetensors"


class _Modality:
    """Each sample's modality token while the LLM runs, read by the LLM adapters' routers.

    Set once per forward / generate call, so routing stays fixed through KV-cache
    decoding (where position 0 is no longer in the input).
    """

    def __init__(self):
        self.token: torch.Tensor | None = None

    @contextmanager
    def given(self, token: torch.Tensor):
        self.token = token
        try:
            yield
        finally:
            self.token = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.token is None:
            raise RuntimeError("the LLM ran outside MMAModel.forward / generate: no modality token to route on")
        if self.token.shape[0] != x.shape[0]:
            raise RuntimeError(f"{self.token.shape[0]} modality tokens for a batch of {x.shape[0]} "
                               "(batch-expanding decoding such as beam search is not supported)")
        return self.token


def _cls_token(x: torch.Tensor) -> torch.Tensor:
    """Vision adapters route on their own input's [CLS] token (LaVIN)."""
    return x[:, 0]


def _adapt(attn, args, kwargs, route):
    x = kwargs["hidden_states"]  # Llama and CLIP blocks both call self_attn(hidden_states=...)
    kwargs["hidden_states"] = attn.mma_adapter(x, route(x))
    return args, kwargs


def _inject(blocks, dim: int, config: MMAConfig, route, like: torch.Tensor) -> None:
    """An adapter per block; its router reads a `dim`-wide vector (the LLM's modality token, or the [CLS])."""
    for block in blocks:
        adapter = MMAdapter(dim, config.adapter_dim, dim, config.router_temperature)
        block.self_attn.mma_adapter = adapter.to(device=like.device, dtype=like.dtype)
        block.self_attn.register_forward_pre_hook(partial(_adapt, route=route), with_kwargs=True)


class MMAModel(nn.Module):
    def __init__(self, llava, config: MMAConfig):
        super().__init__()
        text, vision = llava.config.text_config, llava.config.vision_config
        self.llava = llava
        self.mma_config = config
        self._modality = _Modality()
        like = llava.get_input_embeddings().weight  # new weights follow the base's device and dtype
        _inject(llava.model.language_model.layers, text.hidden_size, config, self._modality, like)
        _inject(llava.model.vision_tower.encoder.layers, vision.hidden_size, config, _cls_token, like)
        self.mma_neck = VisualNeck(vision.hidden_size, text.hidden_size, config.neck_dim,
                                   config.neck_layers(vision.num_hidden_layers)).to(like.device, like.dtype)
        for name, p in self.named_parameters():  # as PEFT's wrapper: only what the method adds trains
            p.requires_grad_("mma_" in name)

    @property
    def image_tokens(self) -> int:
        """Placeholders per image in the text: the image-modality token, then one per neck layer."""
        return 1 + len(self.mma_neck.layers)

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """(inputs_embeds with the image tokens scattered in, one modality token per sample)."""
        placeholder = input_ids == self.llava.config.image_token_id
        has_image = placeholder.any(dim=1)
        modality = self.mma_neck.modality(has_image.long())
        embeds = self.llava.get_input_embeddings()(input_ids)
        images = 0 if pixel_values is None else len(pixel_values)
        if int(has_image.sum()) != images:
            raise ValueError(f"{int(has_image.sum())} samples hold <image> tokens but {images} images came")
        if not images:
            return embeds, modality
        per_row = placeholder.sum(dim=1)[has_image]
        if (per_row != self.image_tokens).any():
            raise ValueError(f"an image sample holds {per_row.tolist()} <image> tokens, MMA needs "
                             f"{self.image_tokens} (encode with image_tokens=mma.image_tokens(...))")
        hidden = self.llava.model.vision_tower(pixel_values.to(embeds.dtype), output_hidden_states=True)
        tokens = torch.cat([modality[has_image, None], self.mma_neck(hidden.hidden_states)], dim=1)
        # masked_scatter fills in row-major order: image samples in row order, as collate stacks pixel_values
        return embeds.masked_scatter(placeholder[..., None], tokens.to(embeds.dtype)), modality

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, **kwargs):
        embeds, modality = self._embed(input_ids, pixel_values)
        with self._modality.given(modality):
            return self.llava(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **generate_kwargs):
        """Token ids including the prompt, as LLaVA's generate (input_ids beside inputs_embeds)."""
        embeds, modality = self._embed(input_ids, pixel_values)
        with self._modality.given(modality):
            return self.llava.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                                       **generate_kwargs)

    def save_pretrained(self, out_dir) -> None:
        """Only the MMA weights (safetensors) and mma_config.json naming the base LLaVA checkpoint."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if "mma_" in n}
        save_file(state, out / WEIGHTS_NAME, metadata={"format": "pt"})
        replace(self.mma_config, base_model_name_or_path=str(self.llava.name_or_path)).save(out)

    @classmethod
    def from_pretrained(cls, mma_dir, base=None, dtype=torch.float32) -> "MMAModel":
        """The base LLaVA (`base`, else the saved base_model_name_or_path) with the saved MMA weights."""
        from safetensors.torch import load_file
        from transformers import LlavaForConditionalGeneration

        from trainables.model import trust_remote_code

        config = MMAConfig.load(mma_dir)
        base = base or config.base_model_name_or_path
        if base and not Path(base).is_absolute() and (Path(mma_dir) / base).is_dir():
            base = Path(mma_dir) / base  # relative to the adapter folder, as study.export writes it
        if not base:
            raise ValueError(f"{mma_dir}: mma_config.json names no base_model_name_or_path; pass base=")
        llava = LlavaForConditionalGeneration.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code())
        model = cls(llava, config)
        state = load_file(Path(mma_dir) / WEIGHTS_NAME)
        expected = {n for n, _ in model.named_parameters() if "mma_" in n}
        if set(state) != expected:
            missing, unused = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{mma_dir}: weights do not match the model (missing {missing[:3]}, unused {unused[:3]})")
        model.load_state_dict(state, strict=False)  # the base's weights came with `llava`
        return model.eval()
