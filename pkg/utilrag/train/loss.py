"""Contrastive losses over in-batch + hard negatives gathered across workers (docs/method.md §3).

Scores s(q, d) = q·d / temperature between each local query and every passage of the global
batch (all workers' groups). ``positive_mask`` marks, per local query, its positives among the
global passages. All losses are means over the local queries that have a positive; with the
gather below and gradient averaging across workers, their gradients equal those of one worker
holding the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

LOG_EPS = math.log(1e-12)  # SumMargLH: the summed positive probability is clamped at 1e-12


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, keeping the gradient path to every worker's copy."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    # Its backward reduce-scatters (sums) every worker's gradient back to the owner of each row.
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)  # type: ignore[arg-type]  # WORLD is set once initialised


def _rows_with_positive(mask: torch.Tensor) -> torch.Tensor:
    return mask.any(dim=1)


def summarg_loss(scores: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """SumMargLH: -log sum_{d+} P(d+|q) = -(logsumexp_{d+} s - logsumexp_all s)."""
    keep = _rows_with_positive(positive_mask)
    if not keep.any():
        return scores.sum() * 0.0
    scores, positive_mask = scores[keep], positive_mask[keep]
    log_all = torch.logsumexp(scores, dim=1)
    log_pos = torch.logsumexp(scores.masked_fill(~positive_mask, float("-inf")), dim=1)
    return -(log_pos - log_all).clamp(min=LOG_EPS).mean()


def joint_loss(scores: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """JointLH: -sum_{d+} log P(d+|q)."""
    keep = _rows_with_positive(positive_mask)
    if not keep.any():
        return scores.sum() * 0.0
    scores, positive_mask = scores[keep], positive_mask[keep]
    log_probs = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    return -(log_probs * positive_mask).sum(dim=1).mean()


def joint_avg_loss(scores: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """Pos-avg with JointLH: -mean_{d+} log P(d+|q), so a query with many positives weighs as much
    as one with a single positive."""
    keep = _rows_with_positive(positive_mask)
    if not keep.any():
        return scores.sum() * 0.0
    scores, positive_mask = scores[keep], positive_mask[keep]
    log_probs = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    return -((log_probs * positive_mask).sum(dim=1) / positive_mask.sum(dim=1)).mean()


def single_loss(scores: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """SingleLH / Rand1LH (InfoNCE): -log P(d+|q) for the first marked positive of each query
    (Rand1LH: the data pipeline marks one positive, sampled per epoch)."""
    keep = _rows_with_positive(positive_mask)
    if not keep.any():
        return scores.sum() * 0.0
    scores, positive_mask = scores[keep], positive_mask[keep]
    target = positive_mask.float().argmax(dim=1)
    return torch.nn.functional.cross_entropy(scores, target)


LOSSES = {"summarg": summarg_loss, "joint": joint_loss, "single": single_loss, "rand1": single_loss}


def loss_for(loss: str, positives: str):
    """The loss function of a (loss, positive sampling) pair; the config refuses the pairs that do
    not go together."""
    return joint_avg_loss if (loss, positives) == ("joint", "avg") else LOSSES[loss]


def contrastive_scores(q: torch.Tensor, p: torch.Tensor, positives: torch.Tensor, temperature: float):
    """Local queries vs the global passages; returns (scores, positive mask over global passages).

    q: (B, d) local queries; p: (B*G, d) local passages, G per query in query order;
    positives: (B, G) bool, which of each query's own G passages are positives.
    """
    p_all = gather_with_grad(p)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    batch, group = positives.shape
    scores = q @ p_all.T / temperature
    mask = torch.zeros_like(scores, dtype=torch.bool)
    offset = rank * batch * group  # equal local batch sizes on every worker (drop_last)
    rows = torch.arange(batch).unsqueeze(1)
    cols = offset + rows * group + torch.arange(group).unsqueeze(0)
    mask[rows, cols] = positives
    return scores, mask
