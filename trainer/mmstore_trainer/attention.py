"""A vision tower's attention over all images of a micro-batch in one variable-length call.

transformers' vision towers (Qwen2-VL's and its successors) attend within each image. Under
``sdpa`` they split the packed patches by image and call SDPA once per image and layer: for a
step of 16 images through the 32 layers of Qwen2-VL-2B's tower that is 512 calls a forward pass
(twice with gradient checkpointing) plus their backward, each paying the launch cost of a small
kernel, and every layer first reads the images' lengths back to the host (a device sync each).
On a GPU the step is then bound by the CPU (measured on an H200: 8% of the step).

transformers passes the towers' ``cu_seqlens`` (image boundaries) to an attention function whose
implementation name contains ``flash`` (its contract for flash-attention kernels), with the
longest image computed once a forward. :data:`VARLEN` is such a function, on PyTorch's own
variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``): one call a layer.
It is registered with transformers' ``AttentionInterface``; :func:`use_varlen` switches the
configs a family names (:meth:`~mmstore_trainer.families.Family.varlen_attention_configs`) to it
at run time (naming it at load time would make transformers look for a hub kernel of that name).
Only on CUDA: the kernel is flash attention's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

VARLEN = "flash_varlen_torch"  # "flash" in the name: transformers passes cu_seqlens to it


def varlen_available(device: torch.device) -> bool:
    """Whether :data:`VARLEN` can run on ``device`` (CUDA, with a torch that has varlen_attn)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = False,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query``/``key``/``value`` ``(1, heads, tokens, dim)``,
    the sequences' boundaries in ``cu_seq_lens_*``; returns ``(1, tokens, heads, dim)``."""
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None or cu_seq_lens_k is None or max_length_q is None or max_length_k is None:
        raise ValueError(f"{VARLEN} needs the sequences' boundaries (cu_seq_lens_q/k, max_length_q/k)")
    if attention_mask is not None or is_causal or dropout:
        raise ValueError(f"{VARLEN} attends fully within each sequence: no mask, causality or dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    out = varlen_attn(
        q,
        k,
        v,
        cu_seq_lens_q.to(torch.int32),
        cu_seq_lens_k.to(torch.int32),
        int(max_length_q),
        int(max_length_k),
        scale=scaling,
    )
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


def use_varlen(configs: Iterable[Any]) -> int:
    """Switch each model config in ``configs`` that runs transformers' ``sdpa`` to :data:`VARLEN`;
    the number switched (a config set to another implementation is left alone)."""
    _register()
    switched = 0
    for config in configs:
        if config._attn_implementation in ("sdpa", VARLEN):
            config._attn_implementation = VARLEN
            switched += 1
    return switched
