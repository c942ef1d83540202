"""DECO's decoder: learned queries laid out on a 2-D grid, refined by layers of SIM then CIM."""

from __future__ import annotations

import torch
from torch import nn

from deco.models.layers import ConvFFN, conv_layer_norm, depthwise_conv, scale_residual_max_pool, upsample_add_conv


class SelfInteraction(nn.Module):
    """SIM: ``t + ffn(LN(dwconv(t + query_pos)))`` on the query map (query_pos only inside the conv input).

    t, query_pos: B x d x qh x qw (query_pos may broadcast over B) -> B x d x qh x qw.
    dwconv: depthwise 9x9 with bias; LN over channels eps 1e-6; ffn: d -> ffn_ratio*d -> d with layer scale.
    With ``kernels="fused"`` dwconv and LN are one op (:func:`~deco.models.layers.conv_layer_norm`).
    """

    def __init__(self, d_model: int, kernel_size: int = 9, ffn_ratio: int = 4, kernels: str = "stock"):
        super().__init__()
        self.dwconv = depthwise_conv(d_model, kernel_size, kernels)
        self.norm = nn.LayerNorm(d_model, eps=1e-6)
        self.ffn = ConvFFN(d_model, ffn_ratio)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        update = self.ffn(conv_layer_norm(self.dwconv, self.norm, query + query_pos))
        return query + update.permute(0, 3, 1, 2)


class CrossInteraction(nn.Module):
    """CIM: fuse the query map with the encoder memory, then pool back to the query grid.

    ``u = upsample_nearest(t, H x W)``; ``y = dwconv(u + memory) + u``; ``z = LN(y)`` (eps 1e-6);
    ``o = z + gamma * ffn(z)`` (residual on the normalised z); ``t' = adaptive_max_pool(o, (qh, qw))``.
    t: B x d x qh x qw, memory: B x d x H x W -> B x d x qh x qw.
    With ``kernels="fused"`` the front (u, y) and the back end (o, the pooling) are each one fused op, so
    neither u + memory nor o is written at full resolution.
    """

    def __init__(
        self, d_model: int, query_grid: tuple[int, int], kernel_size: int = 9, ffn_ratio: int = 4, kernels: str = "stock"
    ):
        super().__init__()
        self.dwconv = upsample_add_conv(d_model, kernel_size, kernels)
        self.norm = nn.LayerNorm(d_model, eps=1e-6)
        self.ffn = ConvFFN(d_model, ffn_ratio)
        self.pool = scale_residual_max_pool(query_grid, kernels)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        normed = self.norm(self.dwconv(query, memory).permute(0, 2, 3, 1))
        return self.pool(normed, self.ffn.unscaled(normed), self.ffn.gamma)


class DecoderLayer(nn.Module):
    """One decoder layer: SIM then CIM. forward(t B x d x qh x qw, memory, query_pos) -> B x d x qh x qw."""

    def __init__(self, d_model: int, query_grid: tuple[int, int], ffn_ratio: int = 4, kernels: str = "stock"):
        super().__init__()
        self.sim = SelfInteraction(d_model, ffn_ratio=ffn_ratio, kernels=kernels)
        self.cim = CrossInteraction(d_model, query_grid, ffn_ratio=ffn_ratio, kernels=kernels)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        return self.cim(self.sim(query, query_pos), memory)


class Decoder(nn.Module):
    """Learned content queries ``tgt`` and positions ``query_pos`` (each Q x d, query i at grid cell
    (i // qw, i % qw)), refined by ``num_layers`` :class:`DecoderLayer`.

    forward(memory B x d x H x W) -> B x Q x d per layer, a tuple of ``num_layers`` tensors, each passed through
    the shared final LayerNorm(d) (eps 1e-5); the un-normalised map feeds the next layer.
    """

    def __init__(
        self,
        d_model: int = 480,
        num_queries: int = 100,
        query_grid: tuple[int, int] = (10, 10),
        num_layers: int = 6,
        ffn_ratio: int = 4,
        kernels: str = "stock",
    ):
        super().__init__()
        self.query_grid = tuple(query_grid)
        self.tgt = nn.Embedding(num_queries, d_model)
        self.query_pos = nn.Embedding(num_queries, d_model)
        self.layers = nn.ModuleList(DecoderLayer(d_model, self.query_grid, ffn_ratio, kernels) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def _grid(self, embedding: nn.Embedding) -> torch.Tensor:
        """Q x d embedding -> 1 x d x qh x qw map, row-major."""
        return embedding.weight.t().reshape(1, -1, *self.query_grid)

    def forward(self, memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query_pos = self._grid(self.query_pos)
        query = self._grid(self.tgt).expand(memory.shape[0], -1, -1, -1)
        outputs = []
        for layer in self.layers:
            query = layer(query, memory, query_pos)
            outputs.append(self.norm(query.flatten(2).transpose(1, 2)))
        return tuple(outputs)


def build_decoder(
    d_model: int = 480,
    num_queries: int = 100,
    query_grid: tuple[int, int] = (10, 10),
    num_layers: int = 6,
    ffn_ratio: int = 4,
    kernels: str = "stock",
) -> Decoder:
    return Decoder(d_model, num_queries, query_grid, num_layers, ffn_ratio, kernels)
