"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: every Qwen-specific key and rule the trainer uses.

* Processor output: ``pixel_values`` (one row per patch) and ``image_grid_thw`` (one row per
  image); an image's grid is its ``image_grid_thw`` row, and it expands to
  ``t * h * w // merge_size**2`` ``<|image_pad|>`` tokens.
* Positions: multimodal rope (3 rows: temporal, height, width) from the model's own
  ``model.model.get_rope_index`` (transformers 5.x signature: ``input_ids``,
  ``mm_token_type_ids``, ``image_grid_thw``), computed per sample as if it ran alone.
* Packing: transformers' Qwen text models accept a 4-row ``position_ids`` whose first row is the
  plain text position; with no attention mask and no KV cache, ``masking_utils`` reads sample
  boundaries from resets in that row (``find_packed_sequence_indices``) and builds a
  block-diagonal causal mask (sdpa/eager/flex) or passes the boundaries to flash-attention's
  varlen kernel. So each sample's first row is ``arange(len)``: it resets at every boundary.
  The vision tower already attends per image (``cu_seqlens`` from ``image_grid_thw``); its
  config is the one :meth:`QwenVLFamily.varlen_attention_configs` names.
  ``use_cache=False`` is required: with a cache, transformers skips the packed-mask detection.
* FSDP units: the language model's decoder layers, which every forward runs. The vision tower
  runs only for micro-batches with images, so it stays in the root unit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmstore_trainer.families.base import Family, ImageFeatures, register

MM_TEXT, MM_IMAGE = 0, 1  # mm_token_type_ids values (video, 2, is not carried by descriptors)


@register("qwen2_vl", "qwen3_vl")
class QwenVLFamily(Family):
    """Qwen2-VL (and 2.5, whose layout family is ``qwen2_vl``) and Qwen3-VL."""

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def image_features(self, processor_output: Mapping[str, Any]) -> ImageFeatures:
        grid_thw = processor_output["image_grid_thw"]
        if grid_thw.shape[0] != 1:
            raise ValueError(f"expected the output of one image, got {grid_thw.shape[0]} grids")
        return ImageFeatures(
            tensors={"pixel_values": processor_output["pixel_values"], "image_grid_thw": grid_thw},
            grid=tuple(int(x) for x in grid_thw[0].tolist()),
        )

    def tokens_per_image(self, grid: tuple[int, ...]) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size**2

    def position_ids(
        self, model: Any, input_ids: torch.Tensor, grids: Sequence[tuple[int, ...]]
    ) -> torch.Tensor:
        """``(4, L)``: the text position ``arange(L)``, then the 3 mrope rows of get_rope_index."""
        ids = input_ids.view(1, -1)
        token_type = (ids == model.config.image_token_id).to(torch.int32) * MM_IMAGE
        grid_thw = torch.tensor(grids, dtype=torch.long) if grids else None
        mrope, _ = model.model.get_rope_index(ids.cpu(), token_type.cpu(), image_grid_thw=grid_thw)
        text = torch.arange(ids.shape[1], dtype=mrope.dtype).view(1, -1)
        return torch.cat([text, mrope[:, 0]], dim=0)

    def pack_position_ids(self, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(4, 1, L_total)``: row 0 restarts at 0 for each sample (the packing boundaries)."""
        return torch.cat(list(per_sample), dim=1).unsqueeze(1)

    def forward_kwargs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, model_inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False, **model_inputs}

    def shard_units(self, model: Any) -> list[Any]:
        return list(model.model.language_model.layers)

    def varlen_attention_configs(self, model: Any) -> list[Any]:
        return [model.model.visual.config]
