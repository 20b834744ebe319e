"""The token cross entropy every loss in the project is made of: next-token targets, fp32 log-softmax,
targets equal to IGNORE_INDEX (padding, prompt tokens of SFT samples) left out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the Hugging Face convention for targets that carry no loss


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of -log p(target) over the targets that are not `ignore_index`, in fp32.

    logits [..., vocab], targets [...] (the same leading shape). A sum, not a mean, so that
    micro-batches and ranks can be added up and divided once by the total number of targets.
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def cross_entropy_mean(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean of -log p(target) over the targets that are not `ignore_index`, in fp32 (NaN when none is)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)
