"""The policy-gradient loss: token-level, clipped importance ratio against the inference logprobs.

Logprob definition (must match what the inference service returned): vLLM's
``processed_logprobs`` are the logprobs of the distribution it sampled from, i.e. after dividing
the logits by the sampling temperature. So the new policy's logprob of token ``j`` is
``log_softmax(logits[j - 1] / temperature)[token_j]``, computed in float32 (also under bf16
autocast). Top-k/top-p truncation is not mirrored: sample with them off (vLLM's defaults) when
training on the ratio.

Loss (PPO/GRPO style, per token, "token-level" normalization as in DAPO): with
``ratio = exp(new - old)`` and advantage ``A``::

    loss_t = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    loss   = sum over trained tokens of loss_t / (trained tokens in the whole step)

so every trained token of an optimizer step weighs the same, however the step was packed into
micro-batches. A token counts as *clipped* when the clipped term is the active one (its
gradient is zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, banned: torch.Tensor | None = None
) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` at ``tokens``; ``logits`` (K, V), ``tokens`` (K,).

    ``banned`` token ids are removed from the distribution (logit -inf), as the inference service
    removes them from sampling (image markup, unless a request allows it): vLLM's processed
    logprobs are renormalised over the tokens left, and so must the trainer's be, or every ratio
    is off by the banned tokens' probability mass.
    """
    scaled = logits.float() / temperature
    if banned is not None and banned.numel():
        scaled = scaled.index_fill(-1, banned.to(scaled.device), float("-inf"))
    return scaled.gather(-1, tokens.view(-1, 1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


@dataclass
class PgStats:
    """Sums over the trained tokens of an optimizer step (added up across micro-batches)."""

    tokens: int = 0
    loss_sum: float = 0.0
    ratio_sum: float = 0.0
    ratio_min: float = float("inf")
    ratio_max: float = float("-inf")
    clipped: int = 0

    def add(self, other: PgStats) -> PgStats:
        return PgStats(
            self.tokens + other.tokens,
            self.loss_sum + other.loss_sum,
            self.ratio_sum + other.ratio_sum,
            min(self.ratio_min, other.ratio_min),
            max(self.ratio_max, other.ratio_max),
            self.clipped + other.clipped,
        )

    def summary(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        empty = self.tokens == 0
        return {
            "loss": self.loss_sum / n,
            "ratio_mean": self.ratio_sum / n,
            "ratio_min": 0.0 if empty else self.ratio_min,
            "ratio_max": 0.0 if empty else self.ratio_max,
            "clip_frac": self.clipped / n,
        }


def clipped_pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    normalizer: int,
) -> tuple[torch.Tensor, PgStats]:
    """The loss of one micro-batch's trained tokens (all (K,)), divided by ``normalizer`` (the
    step's trained-token count), and its statistics."""
    ratio = torch.exp(logprobs - old_logprobs.to(logprobs.dtype))
    adv = advantages.to(logprobs.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = per_token.sum() / max(normalizer, 1)
    with torch.no_grad():
        k = int(ratio.numel())
        stats = PgStats(
            tokens=k,
            loss_sum=float(per_token.sum()),
            ratio_sum=float(ratio.sum()),
            ratio_min=float(ratio.min()) if k else float("inf"),
            ratio_max=float(ratio.max()) if k else float("-inf"),
            clipped=int((clipped > unclipped).sum()),
        )
    return loss, stats
