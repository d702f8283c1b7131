"""Resizing a model that DistributedDataParallel trains on several processes.

DDP fixes its gradient buckets to the parameter shapes it sees when it wraps a model, and every
rank must end a resize with the same widths and the same values. :func:`resize_ddp` does not
let each rank resize on its own, because two processes need not compute the same floating-point
result: the source rank runs the whole resize (``Resizer.step``: spectrum, policy, fold) and
broadcasts the new widths; every other rank resizes its copy structurally to those widths (a
cheap magnitude prune or a grow, whose values are overwritten); every rank reports success or
its error in one collective, so a failure anywhere raises :class:`DistributedResizeError` on
every rank instead of a hang; then every parameter, buffer and optimizer-state tensor is
broadcast from the source (one flat buffer per dtype and device), and the DDP wrapper is built
anew around the same module. The optimizer stays the same object; the old wrapper's reducer,
autograd hooks and gradient buckets are released. See docs/design.md, "Resizing under DDP and
torch.compile".

Example (a user's own loop, launched with ``torchrun --nproc_per_node 2 train.py``)::

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from svdgrow import Policy, Resizer
    from svdgrow.distributed import resize_ddp

    dist.init_process_group("gloo")       # "nccl" on GPUs; torchrun sets rank and world size
    torch.manual_seed(0)                  # the same initial model on every rank
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    resizer = Resizer(model, example_batch, policy=Policy(energy_eps=1e-3), optimizer=opt)
    ddp = DDP(model)
    for step, (x, y) in enumerate(my_shard_of_the_batches):
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del loss                          # the autograd graph holds the old shapes
        if step % 100 == 99:
            ddp, report = resize_ddp(ddp, resizer, data=x)   # rank 0 decides; same optimizer
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .compiled import after_resize
from .resizer import Resizer, StepReport

__all__ = [
    "DistributedResizeError",
    "broadcast_state",
    "check_all_ok",
    "collective_errors",
    "resize_ddp",
    "rewrap",
    "state_checksum",
    "state_tensors",
]


class DistributedResizeError(RuntimeError):
    """A resize (or a collective around it) failed on one or more ranks; raised on every rank.

    Attributes:
        failures: rank -> ``"ExceptionType: message"`` of each rank that failed.
        what: what was being done (e.g. ``"the resize at step 40"``).
        world_size: the number of ranks.
    """

    def __init__(
        self, failures: dict[int, str], what: str, world_size: int, floating: set[int] = frozenset()
    ):
        self.failures = dict(sorted(failures.items()))
        self.what = what
        self.world_size = world_size
        self._floating = set(floating) & set(failures)
        ranks = ", ".join(f"rank {r}: {text}" for r, text in self.failures.items())
        super().__init__(f"{what} failed on {len(self.failures)} of {world_size} ranks ({ranks})")

    @property
    def diverged(self) -> bool:
        """Every failure is a FloatingPointError (non-finite weights or loss), not a fault."""
        return bool(self.failures) and self._floating == set(self.failures)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def collective_errors(what: str, group=None) -> Iterator[None]:
    """Turn a failed collective in the ``with`` block (a peer that died, or hung past the
    group's timeout) into a :class:`DistributedResizeError` naming this rank and ``what``."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if isinstance(exc, DistributedResizeError):
            raise
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        why = f"a collective failed (a peer died or hung past the timeout): {_describe(exc)}"
        raise DistributedResizeError({rank: why}, what, world) from exc


def check_all_ok(error: BaseException | None, what: str, group=None, extra=None) -> list:
    """The error-propagation collective: every rank says whether its part succeeded.

    Call it on every rank after a step that may fail on some of them (each rank catches its own
    exception and passes it here): a failure anywhere is raised on every rank, so no rank goes
    on to a collective that a failed peer will never join.

    Args:
        error: this rank's exception, or None.
        what: what the step was, for the message (``"the resize at step 40"``).
        group: the process group (default: the world).
        extra: any picklable value to gather from every rank along with the verdict.

    Returns:
        every rank's ``extra``, by rank.

    Raises:
        DistributedResizeError: naming every rank that failed and its error (chained to this
            rank's own exception when it is one of them).
    """
    text = None if error is None else _describe(error)
    mine = (text, isinstance(error, FloatingPointError), extra)
    gathered: list = [None] * dist.get_world_size(group)
    with collective_errors(what, group):
        dist.all_gather_object(gathered, mine, group=group)
    failures = {r: text for r, (text, _, _) in enumerate(gathered) if text is not None}
    if failures:
        floating = {r for r, (_, fpe, _) in enumerate(gathered) if fpe}
        raise DistributedResizeError(failures, what, len(gathered), floating) from error
    return [x for _, _, x in gathered]


# ----------------------------------------------------------------------------------------------
# the state: every tensor a resize touches


def state_tensors(
    module: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> list[tuple[str, Tensor]]:
    """Every parameter, buffer and optimizer-state tensor, named, in a fixed order.

    Parameters and buffers in ``named_parameters()`` / ``named_buffers()`` order; then, for
    every parameter of every optimizer param group in order, its state's tensors by sorted key
    (``optim:<parameter name>:<key>``).
    """
    out = [(f"param:{n}", p) for n, p in module.named_parameters()]
    out += [(f"buffer:{n}", b) for n, b in module.named_buffers()]
    if optimizer is not None:
        names = {id(p): n for n, p in module.named_parameters()}
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                state = optimizer.state.get(p, {})
                name = names.get(id(p), f"group{gi}.{pi}")
                for key in sorted(state, key=str):
                    if isinstance(state[key], Tensor):
                        out.append((f"optim:{name}:{key}", state[key]))
    return out


def state_checksum(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """sha256 (hex) over the names, dtypes, shapes and raw bytes of :func:`state_tensors`:
    equal on two ranks exactly when they hold bit-identical weights, buffers and optimizer
    state."""
    h = hashlib.sha256()
    for name, t in state_tensors(module, optimizer):
        flat = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name} {flat.dtype} {tuple(t.shape)}\n".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _layout(tensors: list[tuple[str, Tensor]]) -> str:
    text = "\n".join(f"{n} {t.dtype} {tuple(t.shape)} {t.device.type}" for n, t in tensors)
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def broadcast_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    src: int = 0,
    group=None,
    check: bool = True,
) -> int:
    """Overwrite every parameter, buffer and optimizer-state tensor with rank ``src``'s.

    One broadcast per (dtype, device) of all those tensors flattened (a CPU tensor travels
    through the current CUDA device when the group's backend is NCCL).

    Args:
        module: the (unwrapped) model.
        optimizer: its optimizer (None: parameters and buffers only).
        src: the source rank, in ``group``.
        group: the process group (default: the world).
        check: first check, in one collective, that every rank holds tensors of the same names,
            dtypes and shapes (a mismatch raises instead of corrupting the values).

    Returns:
        the number of bytes broadcast.

    Raises:
        DistributedResizeError: the layouts differ, or a collective failed or timed out.
    """
    tensors = state_tensors(module, optimizer)
    if check:
        layouts = check_all_ok(None, "the state layout check", group, extra=_layout(tensors))
        odd = [r for r, lay in enumerate(layouts) if lay != layouts[src]]
        if odd:
            why = f"its tensors differ in name, dtype or shape from rank {src}'s"
            raise DistributedResizeError(dict.fromkeys(odd, why), "broadcast_state", len(layouts))
    nccl = dist.get_backend(group) == "nccl"
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for _, t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    rank, sent = dist.get_rank(group), 0
    for (dtype, device), ts in buckets.items():
        comm = (
            torch.device("cuda", torch.cuda.current_device())
            if nccl and device.type == "cpu"
            else device
        )
        if rank == src:
            flat = torch.cat([t.detach().reshape(-1) for t in ts]).to(comm)
        else:
            flat = torch.empty(sum(t.numel() for t in ts), dtype=dtype, device=comm)
        with collective_errors("broadcast_state", group):
            dist.broadcast(flat, group=group, group_src=src)
        sent += flat.numel() * flat.element_size()
        if rank != src:
            for t, chunk in zip(ts, flat.split([t.numel() for t in ts]), strict=True):
                t.detach().copy_(chunk.view(t.shape))
    return sent


# ----------------------------------------------------------------------------------------------
# the wrapper


def _ddp_settings(ddp: DDP) -> dict:
    """The constructor arguments of ``ddp`` that shape how it reduces (read back from it)."""
    settings = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "process_group": ddp.process_group,
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": ddp.static_graph,
    }
    if hasattr(ddp, "forward_sync_buffers"):  # torch >= 2.13 (broadcast_buffers deprecated)
        settings["forward_sync_buffers"] = ddp.forward_sync_buffers
    else:  # pragma: no cover - older torch
        settings["broadcast_buffers"] = ddp.broadcast_buffers
    if not getattr(ddp, "bucket_bytes_cap_default", True):
        settings["bucket_cap_mb"] = ddp.bucket_bytes_cap / 2**20
    return settings


def _dismantle(ddp: DDP) -> None:
    """Release the old wrapper's reducer: its autograd hooks, its gradient buckets and the
    gradient accumulators it holds, whose recorded shapes are stale after a resize (a new
    reducer built while they live fails in backward with 'invalid gradient')."""
    reducer = getattr(ddp, "reducer", None)
    if reducer is not None:
        with contextlib.suppress(Exception):  # hooks already gone: nothing to remove
            reducer._remove_autograd_hooks()
    ddp.reducer = None
    ddp.logger = None


def rewrap(ddp_model: DDP, init_sync: bool = True, **ddp_kwargs) -> DDP:
    """A new DDP wrapper around ``ddp_model.module``, with the old one's settings.

    The old wrapper is dismantled (do not call it again), every gradient is dropped (a resize
    comes between an optimizer step and the next backward), every graph ``torch.compile``
    cached is dropped (``torch.compiler.reset()``: a compiled old wrapper holds its reducer;
    compile the new wrapper again), and the new wrapper builds its buckets for the current
    shapes. Communication hooks registered on the old wrapper are not carried over: register
    them again on the new one.

    Args:
        ddp_model: the wrapper to replace.
        init_sync: let DDP check the shapes across ranks and broadcast parameters and buffers
            from rank 0 (:func:`resize_ddp` passes False: it has just broadcast everything).
        ddp_kwargs: DDP constructor arguments that replace the old wrapper's (the settings
            carried over are device_ids, output_device, dim, process_group,
            find_unused_parameters, gradient_as_bucket_view, static_graph, the buffer sync and a
            non-default bucket_cap_mb).
    """
    module = ddp_model.module
    settings = {**_ddp_settings(ddp_model), **ddp_kwargs}
    _dismantle(ddp_model)
    after_resize()  # graphs torch.compile made of the old wrapper hold its reducer
    for p in module.parameters():
        p.grad = None
    return DDP(module, init_sync=init_sync, **settings)


# ----------------------------------------------------------------------------------------------
# the resize


def _resize_structurally(resizer: Resizer, widths: dict[str, int]) -> None:
    """Give the local model the source's widths the cheapest way (magnitude prune, or grow):
    only the shapes matter, every value is overwritten by the broadcast that follows."""
    local = resizer.widths()
    todo = {g: w for g, w in widths.items() if local.get(g) != w}
    if not todo:
        return
    mode, resizer.mode = resizer.mode, "magnitude"
    try:
        resizer.apply(todo)
    finally:
        resizer.mode = mode
        if resizer.history:
            resizer.history.pop()  # the source's report is appended instead


def resize_ddp(
    ddp_model: DDP,
    resizer: Resizer,
    data=None,
    budget: float | None = None,
    *,
    step: Callable[[], StepReport] | None = None,
    src: int = 0,
    what: str = "the resize",
    ddp_kwargs: dict | None = None,
    before_rewrap: Callable[[], None] | None = None,
) -> tuple[DDP, StepReport]:
    """One resize of a DDP-trained model, identical on every rank; call it on every rank.

    Drop every tensor that holds the last step's autograd graph (the loss, the outputs) first:
    the graph holds the parameters' gradient accumulators with their old shapes.

    Args:
        ddp_model: the DDP wrapper of ``resizer.model``.
        resizer: a :class:`~svdgrow.Resizer` built on the unwrapped module (on every rank).
        data: the batch for ``mode="data"`` (only the source rank's is used).
        budget: the budget for this step (see ``Resizer.step``).
        step: what the source runs instead of ``resizer.step(data=data, budget=budget)`` (e.g.
            that plus a renormalisation); it must return the step's report.
        src: the rank (in the wrapper's process group) that decides and whose values every
            rank ends with.
        what: the step's name in error messages.
        ddp_kwargs: DDP arguments for the new wrapper (see :func:`rewrap`).
        before_rewrap: called on every rank when a width changed, before the new wrapper is
            built: drop every reference to what was built on the old wrapper there. A
            ``torch.compile`` of the old wrapper holds its gradient accumulators, whose shapes
            are stale: built while it lives, the new wrapper fails in backward ("invalid
            gradient"). Compile the returned wrapper again.

    Returns:
        ``(wrapper, report)``: a new DDP wrapper when a width changed (the old one is
        dismantled), else ``ddp_model``; and the source's report, the same on every rank.

    Raises:
        DistributedResizeError: on every rank, when the resize failed on any rank (naming each
            and its error) or a collective failed or timed out. The source's model is unchanged
            when its resize failed (a resize is all-or-nothing); after a failure elsewhere the
            ranks may hold different widths: resume from a checkpoint.
    """
    if resizer.model is not ddp_model.module:
        raise ValueError("resize_ddp: the resizer must be built on ddp_model.module")
    group = ddp_model.process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    payload, cause = _run_on_source(rank == src, resizer, step, data, budget)
    box = [payload]
    with collective_errors(what, group):
        dist.broadcast_object_list(box, group=group, group_src=src)
    payload = box[0]
    if "error" in payload:
        floating = {src} if payload["floating"] else set()
        raise DistributedResizeError({src: payload["error"]}, what, world, floating) from cause
    report: StepReport = payload["report"]
    error = _follow_source(resizer, payload) if rank != src else None
    layout = _layout(state_tensors(resizer.model, resizer.optimizer)) if error is None else None
    layouts = check_all_ok(error, what, group, extra=layout)
    odd = {r: "its tensors differ in dtype or shape from the source's after the resize"
           for r, lay in enumerate(layouts) if lay != layouts[src]}  # fmt: skip
    if odd:
        raise DistributedResizeError(odd, what, world)
    if not report.changed:
        return ddp_model, report
    broadcast_state(resizer.model, resizer.optimizer, src, group, check=False)
    if before_rewrap is not None:
        before_rewrap()
    return rewrap(ddp_model, init_sync=False, **(ddp_kwargs or {})), report


def _follow_source(resizer: Resizer, payload: dict) -> Exception | None:
    """On the other ranks: the source's widths (structurally), generator state and report;
    the exception, if any (every rank must hear of it: :func:`check_all_ok`)."""
    try:
        if payload["report"].changed:
            _resize_structurally(resizer, payload["widths"])
        resizer.generator.set_state(payload["generator"])  # every rank's resizer alike
        resizer.history.append(payload["report"])
    except Exception as exc:  # noqa: BLE001 - returned, reported to every rank
        return exc
    return None


def _run_on_source(
    is_src: bool, resizer: Resizer, step, data, budget
) -> tuple[dict | None, BaseException | None]:
    """On the source: run the resize; the payload to broadcast (report, widths, generator
    state; or the error) and the exception, if any."""
    if not is_src:
        return None, None
    try:
        report = step() if step is not None else resizer.step(data=data, budget=budget)
    except Exception as exc:  # noqa: BLE001 - reported to every rank, raised on every rank
        return {"error": _describe(exc), "floating": isinstance(exc, FloatingPointError)}, exc
    state = {
        "report": report,
        "widths": resizer.widths(),
        "generator": resizer.generator.get_state(),
    }
    return state, None
