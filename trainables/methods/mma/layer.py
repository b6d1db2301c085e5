"""The two trainable pieces of MMA (LaVIN): the routed MM-Adapter and the visual neck."""

from __future__ import annotations

import torch
from torch import nn


class MMAdapter(nn.Module):
    """x + w0 * up0(down(x)) + w1 * up1(down(x)), (w0, w1) = softmax(router(route) / temperature).

    One down-projection shared by two up-projections (LaVIN's RepAdapter_Router: no
    activation, so it can be merged into the attention's input projections). The ups
    start at zero, so a fresh adapter is the identity and training starts from the base.
    """

    def __init__(self, dim: int, adapter_dim: int, router_dim: int, router_temperature: float):
        super().__init__()
        self.down = nn.Linear(dim, adapter_dim)
        self.up = nn.ModuleList(nn.Linear(adapter_dim, dim) for _ in range(2))
        self.router = nn.Linear(router_dim, 2)
        self.router_temperature = router_temperature
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def weights(self, route: torch.Tensor) -> torch.Tensor:
        """(batch, 2) mixing weights from one routing vector per sample."""
        return torch.softmax(self.router(route) / self.router_temperature, dim=-1)

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        w = self.weights(route).to(x.dtype)[:, None, :]  # (batch, 1, 2): one mix per sample, every position
        h = self.down(x)
        return x + w[..., 0:1] * self.up[0](h) + w[..., 1:2] * self.up[1](h)


class VisualNeck(nn.Module):
    """LaVIN's visual neck and modality tokens: what replaces LLaVA's projector.

    `mlp` maps the [CLS] token of each selected vision layer to the LLM width (one MLP
    shared by all layers, as LaVIN's adapter_proj); `modality` holds the two modality
    tokens (0 = text-only, 1 = image) that drive the LLM adapters' routers.
    """

    def __init__(self, vision_dim: int, llm_dim: int, neck_dim: int, layers: tuple[int, ...]):
        super().__init__()
        self.layers = layers  # indices into hidden_states; plain ints, not saved
        self.mlp = nn.Sequential(nn.Linear(vision_dim, neck_dim), nn.GELU(), nn.Linear(neck_dim, llm_dim))
        self.modality = nn.Embedding(2, llm_dim)

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(images, len(layers), llm_dim) from the vision tower's hidden states."""
        cls = torch.stack([hidden_states[i][:, 0] for i in self.layers], dim=1)
        return self.mlp(cls)
