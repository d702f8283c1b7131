"""svdgrow.distributed on 2 CPU processes (gloo): resize_ddp keeps every rank bit-identical,
rewraps, keeps the optimizer, works with a torch.compile'd wrapper, and turns a failure on one
rank (or a silent peer) into an error on every rank.

One spawn of 2 processes runs every scenario in order (starting processes costs more than the
scenarios); each rank writes what it saw to a JSON file that the tests read.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from svdgrow import Policy, Resizer
from svdgrow.distributed import (
    DistributedResizeError,
    broadcast_state,
    resize_ddp,
    state_checksum,
)

WORLD = 2
TIMEOUT_S = 5  # the process group's collective timeout


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.LeakyReLU(),
        nn.Conv2d(12, 12, 3, padding=1, stride=2), nn.BatchNorm2d(12), nn.LeakyReLU(),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 10),
    )  # fmt: skip


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step % 4 + rank)  # 4 batches per rank, cycled
    x = torch.randn(32, 1, 8, 8, generator=g)
    return x, (x.mean((1, 2, 3)) * 20).long().clamp(-4, 5) + 4


def _gather(obj) -> list:
    out: list = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def _train_and_resize(rank: int) -> dict:
    """20 steps with a resize every 4 (a shrinking budget, data mode)."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x0, _ = _batch(0, rank)
    rs = Resizer(model, x0[:2], policy=Policy(energy_eps=1e-3), optimizer=opt, mode="data")
    ddp = DDP(model)
    start = sum(p.numel() for p in model.parameters())
    seen: dict = {"losses": [], "checksums": [], "widths": [], "wrappers": []}
    for step in range(20):
        x, y = _batch(step, rank)
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen["losses"].append(loss.item())
        del loss
        if step % 4 == 3:
            old = ddp
            budget = start * (0.8 ** (step // 4 + 1))
            ddp, report = resize_ddp(ddp, rs, data=x, budget=budget)
            changed = ddp is not old
            gone = weakref.ref(old)
            del old
            gc.collect()
            seen["wrappers"].append([changed, report.changed, gone() is None])
            seen["checksums"].append(state_checksum(model, opt))
            seen["widths"].append(rs.widths())
    seen["same_optimizer"] = rs.optimizer is opt and ddp.module is model
    seen["params"] = [start, sum(p.numel() for p in model.parameters())]
    seen["history"] = len(rs.history)
    return seen


def _failures(rank: int) -> dict:
    """A resize that fails on rank 1 only (its structural resize), then one on rank 0."""
    out = {}
    for bad in (1, 0):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rs = Resizer(model, _batch(0, rank)[0][:2], optimizer=opt, mode="weights")
        ddp = DDP(model)
        group = rs.resizable()[0].name
        if rank == bad:

            def boom(*args, **kwargs):
                raise ValueError(f"injected on rank {rank}")

            rs.apply = boom
            rs.step = boom
        t0 = time.perf_counter()
        try:
            resize_ddp(ddp, rs, step=lambda rs=rs, g=group: rs.apply({g: 7}))
            out[bad] = {"raised": None}
        except DistributedResizeError as exc:
            out[bad] = {"raised": str(exc), "ranks": list(exc.failures), "diverged": exc.diverged}
        out[bad]["seconds"] = time.perf_counter() - t0
        dist.barrier()
    return out


def _layout_mismatch(rank: int) -> str | None:
    model = _net()
    if rank == 1:
        model[7] = nn.Linear(12 * 4 * 4, 11)
    try:
        broadcast_state(model)
    except DistributedResizeError as exc:
        return str(exc)
    return None


def _compiled_ddp(rank: int) -> dict:
    """torch.compile of the DDP wrapper across two resizes: the compiled old wrapper is dropped
    before the new one is built (before_rewrap), then the new one is compiled."""
    torch.compiler.reset()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _batch(0, rank)
    rs = Resizer(model, x[:2], optimizer=opt, mode="weights")
    ddp = DDP(model)
    box = {"net": torch.compile(ddp, backend="aot_eager")}
    out: dict = {"diffs": [], "checksums": []}
    for width in (9, 6):
        for _ in range(2):
            loss = F.cross_entropy(box["net"](x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del loss
        g = rs.resizable()[0].name
        ddp, _ = resize_ddp(ddp, rs, step=lambda g=g, w=width: rs.apply({g: w}),
                            before_rewrap=lambda: box.pop("net"))  # fmt: skip
        box["net"] = torch.compile(ddp, backend="aot_eager")
        box["net"].eval()
        with torch.no_grad():
            out["diffs"].append((box["net"](x) - model(x)).abs().max().item())
        box["net"].train()
        out["checksums"].append(state_checksum(model, opt))
    return out


def _silent_peer(rank: int) -> dict:
    """Rank 1 never joins the resize: rank 0 raises within the group's timeout."""
    model = _net()
    rs = Resizer(model, _batch(0, rank)[0][:2], mode="weights")
    ddp = DDP(model)
    if rank == 1:
        time.sleep(TIMEOUT_S + 3)
        return {}
    t0 = time.perf_counter()
    try:
        resize_ddp(ddp, rs, step=lambda: rs.apply({rs.resizable()[0].name: 6}))
    except DistributedResizeError as exc:
        return {"raised": str(exc), "seconds": time.perf_counter() - t0}
    return {"raised": None}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timeout)
    result = {"train": _train_and_resize(rank), "failures": _failures(rank),
              "layout": _layout_mismatch(rank)}  # fmt: skip
    result["all_checksums"] = _gather(result["train"]["checksums"])
    result["compiled"] = _compiled_ddp(rank)
    result["silent"] = _silent_peer(rank)  # last: a timed-out group is unusable afterwards
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # skip the group's teardown: rank 0's gloo context has timed out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_every_resize_leaves_the_ranks_bit_identical(ranks):
    a, b = (r["train"] for r in ranks)
    assert len(a["checksums"]) == 5
    assert a["checksums"] == b["checksums"], "the ranks differ after a resize"
    assert ranks[0]["all_checksums"][1] == a["checksums"]
    assert a["widths"] == b["widths"]
    assert a["params"][1] < a["params"][0], "the budget did not shrink the model"


def test_the_wrapper_is_rebuilt_and_the_old_one_released(ranks):
    for r in ranks:
        seen = r["train"]
        assert any(changed for changed, _, _ in seen["wrappers"])
        for changed, report_changed, released in seen["wrappers"]:
            assert changed == report_changed  # a new wrapper exactly when a width changed
            assert released or not changed  # nothing keeps the old wrapper alive
        assert seen["same_optimizer"] and seen["history"] == 5


def test_training_goes_on_after_the_resizes(ranks):
    losses = ranks[0]["train"]["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


@pytest.mark.parametrize("bad", ["1", "0"])
def test_a_failure_on_one_rank_raises_on_every_rank(ranks, bad):
    for r in ranks:
        seen = r["failures"][bad]
        assert seen["raised"] is not None, f"rank did not raise when rank {bad} failed"
        assert seen["ranks"] == [int(bad)] and not seen["diverged"]
        assert f"rank {bad}: ValueError: injected on rank {bad}" in seen["raised"]
        assert seen["seconds"] < TIMEOUT_S  # told at once, not after the timeout


def test_broadcast_state_refuses_different_layouts(ranks):
    for r in ranks:
        assert "rank 1: its tensors differ" in r["layout"]


def test_a_compiled_ddp_wrapper_across_resizes(ranks):
    a, b = (r["compiled"] for r in ranks)
    assert a["checksums"] == b["checksums"]
    assert max(a["diffs"] + b["diffs"]) < 1e-5  # the compiled new wrapper = the eager model


def test_a_silent_peer_ends_the_resize_within_the_timeout(ranks):
    seen = ranks[0]["silent"]
    assert seen["raised"] is not None and "rank 0" in seen["raised"]
    assert "timeout" in seen["raised"] or "Timed out" in seen["raised"]
    assert seen["seconds"] < TIMEOUT_S + 2
