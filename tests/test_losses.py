"""Losses against hand-computed values, and the cross-worker gather against one worker holding
the whole batch (two real gloo processes)."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utilrag.train.loss import contrastive_scores, joint_loss, single_loss, summarg_loss


def lse(values):
    return math.log(sum(math.exp(v) for v in values))


def test_one_positive_summarg_equals_infonce():
    scores = torch.tensor([[2.0, 0.5, -1.0, 0.3]])
    mask = torch.tensor([[False, True, False, False]])
    want = -(0.5 - lse([2.0, 0.5, -1.0, 0.3]))
    assert summarg_loss(scores, mask).item() == pytest.approx(want, rel=1e-6)
    assert single_loss(scores, mask).item() == pytest.approx(want, rel=1e-6)
    assert joint_loss(scores, mask).item() == pytest.approx(want, rel=1e-6)


def test_two_positives_by_hand():
    s = [1.0, 2.0, 0.0, -0.5]
    scores = torch.tensor([s])
    mask = torch.tensor([[True, True, False, False]])
    summarg = -(lse([1.0, 2.0]) - lse(s))  # -log(P1 + P2)
    joint = -((1.0 - lse(s)) + (2.0 - lse(s)))  # -(log P1 + log P2)
    assert summarg_loss(scores, mask).item() == pytest.approx(summarg, rel=1e-6)
    assert joint_loss(scores, mask).item() == pytest.approx(joint, rel=1e-6)
    assert single_loss(scores, mask).item() == pytest.approx(-(1.0 - lse(s)), rel=1e-6)
    # summing probability mass: the implementation's SumMargLH is below its single-positive loss
    assert summarg_loss(scores, mask).item() < single_loss(scores, mask).item()


def test_queries_without_positive_are_skipped_and_clamp_holds():
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.2, 0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[False, True, False], [False, False, False]])
    loss = summarg_loss(scores, mask)
    assert loss.item() == pytest.approx(-(1.0 - lse([3.0, 1.0, 0.0])), rel=1e-6)
    loss.backward()
    assert torch.all(scores.grad[1] == 0)  # the query with no positive contributes nothing
    none = summarg_loss(scores, torch.zeros_like(mask))
    assert none.item() == 0.0
    far = torch.tensor([[100.0, -100.0]])
    assert summarg_loss(far, torch.tensor([[False, True]])).item() == pytest.approx(-math.log(1e-12), rel=1e-6)


def test_mask_marks_own_group_among_gathered_passages():
    q = torch.eye(2, 4)
    p = torch.randn(6, 4)
    positives = torch.tensor([[True, False, False], [False, True, True]])
    scores, mask = contrastive_scores(q, p, positives, temperature=0.5)
    assert scores.shape == (2, 6)
    assert mask.tolist() == [[True, False, False, False, False, False], [False, False, False, False, True, True]]
    torch.testing.assert_close(scores, q @ p.T / 0.5)


# --------------------------------------------------------------------------- gather gradients
def _encoder():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4)


def _batch():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 8, generator=g)  # 4 queries, 2 per worker
    p = torch.randn(12, 8, generator=g)  # 3 passages per query
    positives = torch.tensor([[True, False, False], [True, True, False], [False, True, False], [True, False, True]])
    return q, p, positives


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _encoder()
    q, p, positives = _batch()
    local = slice(2 * rank, 2 * rank + 2)
    scores, mask = contrastive_scores(model(q[local]), model(p[6 * rank : 6 * rank + 6]), positives[local], 1.0)
    summarg_loss(scores, mask).backward()
    for param in model.parameters():  # what DDP/DeepSpeed do: average gradients over workers
        dist.all_reduce(param.grad)
        param.grad /= 2
    queue.put((rank, [param.grad.numpy().copy() for param in model.parameters()]))
    dist.destroy_process_group()


def test_cross_worker_gather_gives_the_single_worker_gradients():
    model = _encoder()
    q, p, positives = _batch()
    scores, mask = contrastive_scores(model(q), model(p), positives, 1.0)
    summarg_loss(scores, mask).backward()
    want = [param.grad for param in model.parameters()]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    for rank in range(2):
        for got, expected in zip(results[rank], want):
            torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-6)
