"""Row-level surgery on a transformers ``DynamicCache`` for continuous batching.

The running batch keeps one left-padded cache: every row has the same number of columns ``T``,
padding columns are masked out by the 2-D attention mask. Rows join by merging a freshly
prefilled cache (padding the shorter one on the left) and leave by selecting the remaining rows;
columns that are padding for every row are then dropped. Sliding-window layers keep only their
last ``window - 1`` columns, right-aligned like everything else, so the same operations apply with
a per-layer length cap.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from steer.errors import UnsupportedArchitectureError


def _check_layer(layer: object) -> DynamicLayer:
    if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
        raise UnsupportedArchitectureError(
            f"cache layer type {type(layer).__name__} cannot be batched by steer", field="model"
        )
    return layer


def _keys_values(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _length_for(layer: DynamicLayer, columns: int) -> int:
    if isinstance(layer, DynamicSlidingWindowLayer):
        return min(columns, layer.sliding_window - 1)
    return columns


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[-2]
    if missing <= 0:
        return tensor
    shape = (*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def _set_columns(layer: DynamicLayer, columns: int) -> None:
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = columns


def merge(
    cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Append the rows of ``other`` to ``cache`` (in place on ``cache``); masks are (B, T) long."""
    columns = max(mask.shape[1], other_mask.shape[1])
    for layer, other_layer in zip(cache.layers, other.layers, strict=True):
        layer, other_layer = _check_layer(layer), _check_layer(other_layer)
        length = _length_for(layer, columns)
        (keys, values), (other_keys, other_values) = _keys_values(layer), _keys_values(other_layer)
        layer.keys = torch.cat([_pad_left(keys, length), _pad_left(other_keys, length)])
        layer.values = torch.cat([_pad_left(values, length), _pad_left(other_values, length)])
        _set_columns(layer, columns)
    merged_mask = torch.cat([_pad_mask(mask, columns), _pad_mask(other_mask, columns)])
    return cache, merged_mask


def _pad_mask(mask: torch.Tensor, columns: int) -> torch.Tensor:
    missing = columns - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def select_rows(
    cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Keep ``rows`` (a LongTensor of indices), then drop columns that are padding everywhere."""
    for any_layer in cache.layers:
        layer = _check_layer(any_layer)
        keys, values = _keys_values(layer)
        layer.keys = keys.index_select(0, rows.to(keys.device))
        layer.values = values.index_select(0, rows.to(values.device))
    mask = mask.index_select(0, rows.to(mask.device))
    real = mask.any(dim=0).nonzero()
    drop = int(real[0].item()) if real.numel() else 0
    if drop:
        columns = mask.shape[1] - drop
        mask = mask[:, drop:]
        for any_layer in cache.layers:
            layer = _check_layer(any_layer)
            length = _length_for(layer, columns)
            keys, values = _keys_values(layer)
            layer.keys = keys[..., -length:, :]
            layer.values = values[..., -length:, :]
            _set_columns(layer, columns)
    return cache, mask
