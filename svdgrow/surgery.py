"""Width surgery: stage 3 of the data flow in DESIGN.md (prune with folding, grow).

Prune a group from ``n`` to ``r`` channels: keep a channel set ``K`` (``|K| = r``), drop the
rest ``D``, and let every consumer ``A`` (viewed ``[out, C, B]``) absorb what the dropped
channels carried as a linear function of the kept ones,

    f_D ~ M f_K + c,   A_K <- A_K + A_D M (every column block),   bias += sum_B A_D c,

where ``f`` is what the consumer reads on the group's channels (after norm and activation).
``M`` and ``c`` are the least-squares fit ``M = S_DK (S_KK + lambda I)^{-1}``,
``c = mu_D - M mu_K`` on the mean ``mu`` and covariance ``S`` of ``f``, and ``K`` comes from
greedy pivoted Cholesky (= column-pivoted Gram-Schmidt) of that covariance weighted by the
norm of the consumer columns reading each channel, so that ``S_KK`` is as well conditioned
as greedy pivoting makes it. Producer rows are kept as they are. The two modes differ only in
where ``mu`` and ``S`` come from:

- "data": measured. Forward hooks capture each consumer's INPUT for the group's channels on a
  batch (a Conv2d: one sample per spatial position; a Linear after Flatten: one per channel
  block), :func:`capture_features`.
- "weights": predicted, no data. :func:`predict_features` models the pre-activation
  ``z = G x + b`` (the group matrix, its direct BatchNorms folded in) as Gaussian with the
  covariance the weight rows imply (isotropic input, scaled to the variance each BatchNorm
  recorded) and the mean the norms recorded, and pushes samples through the model's
  activation (:func:`detect_activation`). Any exact linear relation between the rows survives
  into the fold, so it is exact through linear maps (up to the ridge) and, for channels that
  are positive multiples of kept ones, through ReLU-like activations too. A fold that ignored
  the activation (``M = U_D U_K^{-1}`` from the SVD alone) was measured worse than magnitude
  pruning on a trained BatchNorm+LeakyReLU ResNet; this one is far better (README, "Pruning
  quality").

For convolutions the fold is approximate at the zero-padded borders, where the consumer sees 0
and not ``c`` (the bias is corrected as if every position were interior). When the consumer
has no bias but a BatchNorm directly follows it, the constant goes into that norm's
``running_mean`` (exact in eval mode; in train mode the batch mean absorbs a constant anyway);
otherwise it is dropped with a warning.

Grow a group from ``n`` to ``n + a``: for each producer, ``a`` random rows with the span of the
existing rows and of each other projected out (QR), normalised, scaled to half the smallest
nonzero singular value of that producer; bias 0; BatchNorm weight 1, bias 0, running mean 0,
running var 1; every consumer's new columns 0. The network's output is unchanged.

Every tensor of one resize (weights, biases, norm parameters and buffers, optimizer state) is
moved by ONE ``svdgrow.ops.slice_copy`` call; nothing is assigned until every new tensor exists,
and the assignments go through a :class:`Journal` that restores them all when one fails.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import ops
from .optim import state_to_slice
from .spectrum import bn_affine, bn_output_stats, group_matrix, norm_directly_after, producer_matrix
from .trace import CouplingGraph, Group

__all__ = [
    "pivoted_cholesky",
    "pivoted_cholesky_batched",
    "data_pivot_gram",
    "slice_copy",
    "Journal",
    "GroupChange",
    "plan_prune_data",
    "plan_prune_magnitude",
    "grow_rows",
    "capture_features",
    "predict_features",
    "detect_activation",
    "consumer_offsets",
    "build_plan",
    "commit_plan",
]

logger = logging.getLogger(__name__)

SUPPORTED = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ----------------------------------------------------------------------------------------------
# small numerical pieces


def pivoted_cholesky(G: Tensor, r: int) -> Tensor:
    """The ``r`` pivots of a greedy pivoted Cholesky of a PSD Gram matrix ``G = A^T A``:
    the columns that column-pivoted QR (Gram-Schmidt) of ``A`` would choose.

    Args:
        G (Tensor[n, n]): symmetric positive semi-definite. r: how many (``r <= n``).

    Returns:
        Tensor[r] (int64): pivots in the order chosen.
    """
    n = G.shape[0]
    if r > n:
        raise ValueError(f"pivoted selection: asked for {r} columns out of {n}")
    G = G.double()
    d = G.diagonal().clone()
    tiny = 1e-14 * float(d.abs().max()) if n else 0.0
    L = G.new_zeros(r, n)  # row t: the t-th Cholesky column (contiguous rows)
    order = torch.empty(r, dtype=torch.long, device=G.device)
    for t in range(r):
        j = torch.argmax(d)
        order[t] = j
        dj = d[j]
        col = G[j] - L[:t, j] @ L[:t] if t else G[j].clone()
        L[t] = col * torch.rsqrt(dj.clamp_min(tiny)) * (dj > tiny)
        d.sub_(L[t] * L[t])
        d[j] = float("-inf")
    return order


def pivoted_cholesky_batched(grams: list[Tensor], rs: list[int]) -> list[Tensor]:
    """:func:`pivoted_cholesky` of several Gram matrices at once. On a GPU one padded batch, so
    every step is a handful of batched ops (no host synchronisation) for all groups instead of
    a handful per group; on the CPU a loop over the groups.

    Args:
        grams: PSD matrices ``Tensor[n_i, n_i]`` (on one device). rs: pivots wanted, ``r_i <= n_i``.

    Returns:
        one ``Tensor[r_i]`` (int64) of pivots per matrix, in the order chosen.
    """
    if not grams:
        return []
    if grams[0].device.type == "cpu":  # small ops: a loop is as fast on the CPU, and cheaper
        return [pivoted_cholesky(g, r) for g, r in zip(grams, rs)]  # under thread contention
    return _pivoted_cholesky_padded(grams, rs)


def _pivoted_cholesky_padded(grams: list[Tensor], rs: list[int]) -> list[Tensor]:
    b = len(grams)
    N = max(g.shape[0] for g in grams)
    R = max(rs)
    dev = grams[0].device
    Gp = torch.zeros(b, N, N, dtype=torch.float64, device=dev)
    d = torch.full((b, N), float("-inf"), dtype=torch.float64, device=dev)
    for i, g in enumerate(grams):
        n = g.shape[0]
        if rs[i] > n:
            raise ValueError(f"pivoted selection: asked for {rs[i]} columns out of {n}")
        Gp[i, :n, :n] = g.double()
        d[i, :n] = g.diagonal().double()
    tiny = 1e-14 * torch.where(torch.isfinite(d), d.abs(), torch.zeros_like(d)).amax(1, keepdim=True)
    L = torch.zeros(b, N, R, dtype=torch.float64, device=dev)
    order = torch.zeros(b, R, dtype=torch.long, device=dev)
    for t in range(R):
        j = torch.argmax(d, dim=1)  # [b]
        order[:, t] = j
        dj = d.gather(1, j[:, None])  # [b, 1]
        col = Gp.gather(2, j[:, None, None].expand(b, N, 1)).squeeze(2)  # [b, N]
        if t:
            Lj = L.gather(1, j[:, None, None].expand(b, 1, R))[:, :, :t]  # [b, 1, t]
            col = col - (L[:, :, :t] @ Lj.transpose(1, 2)).squeeze(2)
        ok = dj > tiny
        safe = torch.where(ok & torch.isfinite(dj), dj, torch.ones_like(dj))
        l = torch.where(ok & torch.isfinite(dj), col / safe.sqrt(), torch.zeros_like(col))
        L[:, :, t] = l
        d = d - l * l
        d.scatter_(1, j[:, None], float("-inf"))
    return [order[i, : rs[i]].clone() for i in range(b)]


def weight_block(module: nn.Module, layout, widths: dict[int, int]) -> int:
    """Columns per input channel of a consumer's weight: ``kh*kw`` for a Conv2d, ``h*w`` for a
    Linear after Flatten, 1 for a plain Linear (read from the weight, so it does not matter
    whether the layout's ``block`` counts weight columns or activation entries)."""
    W = module.weight
    C = sum(widths[s] for s in layout.segments)
    cols = int(W[0].numel())
    if C <= 0 or cols % C:
        raise ValueError(
            f"consumer {layout.module!r}: its weight has {cols} columns per output, not a multiple of "
            f"the {C} channels its layout says it reads (segments {layout.segments}); retrace the model"
        )
    return cols // C


def _complement(K: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=K.device)
    mask[K] = False
    return mask.nonzero().flatten()


def slice_copy(src: list[Tensor], row_index: list[Tensor | None], col_index: list[Tensor | None], block: list[int], fill=None) -> list[Tensor]:
    """``svdgrow.ops.slice_copy``: one call for all tensors (a module-level name, so tests can
    count the calls). Each ``src`` is viewed ``[R, C, B]``; ``row_index``/``col_index`` entries
    pick source rows/channels, ``-1`` makes a slice from ``fill`` (zeros when None), None keeps
    the dimension."""
    return ops.slice_copy(src, row_index, col_index, block, fill)


def all_finite(tensors: list[Tensor]) -> Tensor:
    """One 0-d bool: every element of every tensor is finite (one reduction per tensor, one
    check in all; a sum is NaN/inf when any element is)."""
    sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors if t.is_floating_point() and t.numel()])
    return torch.isfinite(sums).all() if sums.numel() else torch.tensor(True)


class Journal:
    """Rollback journal: every assignment is recorded, and :meth:`rollback` undoes them all in
    reverse order."""

    def __init__(self):
        self._undo: list[tuple] = []

    def setattr(self, obj, name: str, value) -> None:
        old = getattr(obj, name)
        self._undo.append(("attr", obj, name, old))
        setattr(obj, name, value)

    def param_data(self, p: Tensor, value: Tensor) -> None:
        old = p.data
        self._undo.append(("data", p, None, old))
        p.data = value

    def setitem(self, d: dict, key, value) -> None:
        had = key in d
        self._undo.append(("item", d, key, d[key] if had else _MISSING))
        d[key] = value

    def rollback(self) -> None:
        while self._undo:
            kind, obj, key, old = self._undo.pop()
            if kind == "attr":
                setattr(obj, key, old)
            elif kind == "data":
                obj.data = old
            elif old is _MISSING:
                obj.pop(key, None)
            else:
                obj[key] = old


_MISSING = object()


# ----------------------------------------------------------------------------------------------
# per-group plans


@dataclass
class GroupChange:
    """What happens to one group.

    Attributes:
        group: the group. old, new: widths. action: 'prune' | 'grow'.
        keep (Tensor[new], int64): kept channels (sorted), for a prune.
        drop (Tensor[old-new], int64): dropped channels, for a prune.
        rows: producer -> its grown rows (Tensor[a, in*kh*kw]), for a grow (a prune keeps
            the kept rows as they are).
        folds: consumer -> (M (Tensor[old-new, new]), c (Tensor[old-new])) for a prune.
    """

    group: Group
    old: int
    new: int
    action: str
    keep: Tensor | None = None
    drop: Tensor | None = None
    rows: dict[str, Tensor] = field(default_factory=dict)
    folds: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def plan_prune_data(modules, graph: CouplingGraph, group: Group, widths: dict[int, int], r: int, feats: dict, ridge: float, offsets: dict, pivots: Tensor | None = None) -> GroupChange:
    """Prune ``group`` to ``r`` channels with the fold fitted on consumer input moments
    (measured: data mode; predicted: weights mode; see the module docstring).

    Args:
        feats: (group id, consumer) -> (mean (Tensor[n]), covariance (Tensor[n, n]), count),
            from :func:`capture_features` or :func:`predict_features`.
        widths: current width of every group id.
        ridge: relative ridge ``lambda = ridge * trace(S_KK) / r``.
        offsets: (group id, consumer) -> channel offset of the group in that consumer.
        pivots: the kept channels when already chosen (batched over groups); else chosen here
            by pivoted Cholesky of :func:`data_pivot_gram`.
    """
    n = widths[group.id]
    if pivots is None:
        pivots = pivoted_cholesky(data_pivot_gram(modules, graph, group, widths, feats, offsets), r)
    K = torch.sort(pivots).values
    Dn = _complement(K, n)
    change = GroupChange(group, n, r, "prune", keep=K, drop=Dn)
    for cons in group.consumers:
        key = (group.id, cons)
        if key not in feats:  # this consumer did not run on the batch: drop without a fold
            continue
        mu, cov, _ = feats[key]
        SKK = cov[K][:, K]
        SKD = cov[K][:, Dn]
        lam = ridge * float(torch.diagonal(SKK).sum()) / max(r, 1) + 1e-12
        M = torch.linalg.solve(SKK + lam * torch.eye(r, dtype=SKK.dtype, device=SKK.device), SKD).T
        c = mu[Dn] - M @ mu[K]
        change.folds[cons] = (M, c)
    return change


def data_pivot_gram(modules, graph: CouplingGraph, group: Group, widths: dict[int, int], feats: dict, offsets: dict) -> Tensor:
    """Covariance of the group's features pooled over its consumers, each channel weighted by
    the norm of the consumer columns that read it (trace-normalised per consumer): the Gram
    matrix whose pivoted Cholesky chooses the kept channels in data mode."""
    n = widths[group.id]
    pooled = None
    for cons in group.consumers:
        key = (group.id, cons)
        if key not in feats:
            continue
        mu, cov, _ = feats[key]
        A = modules[cons].weight.detach().double()
        B = weight_block(modules[cons], graph.consumers[cons], widths)
        Av = A.reshape(A.shape[0], -1, B)
        o = offsets[key]
        a = Av[:, o : o + n, :].pow(2).sum(dim=(0, 2)).sqrt()
        w = a[:, None] * cov * a[None, :]
        tr = float(torch.diagonal(w).sum())
        w = w / tr if tr > 0 else w
        pooled = w if pooled is None else pooled + w
    if pooled is None:
        raise RuntimeError(f"group {group.name!r}: data mode captured no features for its consumers {group.consumers}")
    return pooled


def plan_prune_magnitude(modules, group: Group, n: int, r: int) -> GroupChange:
    """Baseline prune: keep the ``r`` channels whose group-matrix rows are largest, fold
    nothing (what the prototype's "first r by index" improves on only by the choice)."""
    G, _, _, _ = group_matrix(modules, group)
    K = torch.sort(torch.topk(G.norm(dim=1), r).indices).values
    return GroupChange(group, n, r, "prune", keep=K, drop=_complement(K, n))


def grow_rows(W: Tensor, a: int, generator: torch.Generator | None = None, sv: Tensor | None = None) -> Tensor:
    """``a`` new rows for a producer matrix, orthogonal to its rows and to each other.

    Args:
        W (Tensor[n, D]): the producer's current rows (``n + a <= D``).
        a: how many rows. generator: CPU random generator.
        sv: the singular values of ``W`` when already known (else computed here).

    Returns:
        Tensor[a, D] (float64): orthonormal rows with ``W``'s row space projected out, scaled to
        half the smallest nonzero singular value of ``W``.
    """
    n, Dd = W.shape
    if n + a > Dd:
        raise ValueError(f"cannot add {a} rows to a {n} x {Dd} matrix: at most {Dd - n} fit")
    W = W.detach().double()
    R = torch.randn(a, Dd, generator=generator, dtype=torch.float64).to(W.device)
    if n:
        Q, _ = torch.linalg.qr(W.T)  # Tensor[D, n], spans the rows of W
        for _ in range(2):
            R = R - (R @ Q) @ Q.T
    Q2, _ = torch.linalg.qr(R.T)  # Tensor[D, a], orthonormal columns
    if n:
        for _ in range(2):
            Q2 = Q2 - Q @ (Q.T @ Q2)
        Q2, _ = torch.linalg.qr(Q2)
    if sv is None:
        sv = torch.linalg.svdvals(W) if n else torch.zeros(0, dtype=torch.float64)
    sv = sv.double()
    nz = sv[sv > 1e-10 * float(sv.max())] if sv.numel() and float(sv.max()) > 0 else sv[:0]
    scale = 0.5 * float(nz.min()) if nz.numel() else 1e-2
    return scale * Q2.T


# ----------------------------------------------------------------------------------------------
# data-mode features


ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.PReLU)


def detect_activation(model: nn.Module):
    """The model's elementwise activation when it uses one kind only (as modules), else None.

    Weights mode pushes its predicted pre-activations through it; two modules are the same kind
    when their types and ``extra_repr`` (slope, inplace aside) match. A PReLU has learned,
    possibly per-channel slopes: not one function, so None.
    """
    kinds = {}
    for m in model.modules():
        if isinstance(m, ACTIVATIONS):
            if isinstance(m, nn.PReLU):
                return None
            key = (type(m), m.extra_repr().replace("inplace=True", "").strip(", "))
            kinds.setdefault(key, m)
    if len(kinds) != 1:
        return None
    act = next(iter(kinds.values()))
    return lambda x: act(x) if not getattr(act, "inplace", False) else act(x.clone())


def consumer_offsets(graph: CouplingGraph, groups: list[Group], widths: dict[int, int]) -> dict:
    """(group id, consumer) -> channel offset of the group in that consumer's input."""
    offsets = {}
    for g in groups:
        for cons in g.consumers:
            o = 0
            for seg in graph.consumers[cons].segments:
                if seg == g.id and (g.id, cons) not in offsets:
                    offsets[(g.id, cons)] = o
                o += widths[seg]
    return offsets


@torch.no_grad()
def predict_features(modules, graph: CouplingGraph, groups: list[Group], widths: dict[int, int], activation=None, samples: int = 8192, generator: torch.Generator | None = None):
    """Data-free stand-in for :func:`capture_features`: the mean and covariance of every
    consumer's input on a group's channels, predicted from the weights.

    Model: the group's pre-activation ``z = G x + b`` (``G``, ``b``: the group matrix and
    effective bias of :func:`svdgrow.spectrum.group_matrix`, direct BatchNorms folded in) is
    Gaussian. Its covariance is ``sum_p alpha_p G_p G_p^T``: each producer's input isotropic,
    scaled so that the total variance is the one its direct BatchNorm recorded (``weight**2``
    times ``var / (var + eps)``; scale 1 without a norm). Its mean is ``b + G mu`` with the
    input mean ``mu`` fitted (least squares) to the means the norms recorded (their ``bias``;
    a producer's own bias without one), so that any exact linear relation between channels
    holds for the predicted moments too: through a linear activation the fold is exact. A
    BatchNorm after the add applies its eval-mode affine map. The samples go through
    ``activation`` (see :func:`detect_activation`; None: linear, moments exact without
    sampling) and their moments are what every consumer of the group is taken to read.

    Returns:
        the same ``(feats, offsets)`` as :func:`capture_features`.
    """
    offsets = consumer_offsets(graph, groups, widths)
    feats = {}
    for g in groups:
        after = norm_directly_after(g)
        G, blocks, _, b_eff = group_matrix(modules, g)
        target = torch.zeros_like(b_eff)
        gram = torch.zeros(G.shape[0], G.shape[0], dtype=G.dtype, device=G.device)  # G G^T
        cov = torch.zeros_like(gram)
        for p, a, b in blocks:
            GGp = G[:, a:b] @ G[:, a:b].T
            if p in after:
                m, s = bn_output_stats(modules[after[p]])
                alpha = float((s * s).sum()) / max(float(GGp.diagonal().sum()), 1e-30)
            else:
                bias = getattr(modules[p], "bias", None)
                m = bias.detach().double() if bias is not None else torch.zeros_like(b_eff)
                alpha = 1.0
            target += m
            gram += GGp
            cov += alpha * GGp
        lam = 1e-10 * float(gram.diagonal().sum()) + 1e-30
        eye = torch.eye(gram.shape[0], dtype=G.dtype, device=G.device)
        mean = b_eff + gram @ torch.linalg.solve(gram + lam * eye, target - b_eff)  # b + G mu
        for nm, prod in g.norm_after.items():
            if prod is None:  # a BatchNorm after the add: its eval-mode affine map
                sc, sh = bn_affine(modules[nm])
                mean, cov = sc * mean + sh, sc[:, None] * cov * sc[None, :]
        if activation is None:
            mu, fcov = mean, cov
        else:
            ev, Q = torch.linalg.eigh(cov)
            L = Q * ev.clamp_min(0).sqrt()[None, :]
            z = torch.randn(samples, cov.shape[0], dtype=torch.float64, generator=generator).to(cov.device)
            f = activation(mean[None, :] + z @ L.T)
            mu = f.mean(0)
            fc = f - mu
            fcov = fc.T @ fc / max(samples - 1, 1)
        for cons in g.consumers:
            feats[(g.id, cons)] = (mu, fcov, samples)
    return feats, offsets


def _as_args(data):
    return tuple(data) if isinstance(data, (tuple, list)) else (data,)


@torch.no_grad()
def capture_features(model: nn.Module, modules, graph: CouplingGraph, groups: list[Group], widths: dict[int, int], data, max_samples: int = 16384, generator: torch.Generator | None = None):
    """Run ``model`` (in eval mode) on ``data`` and collect, for every consumer of every group,
    the mean and covariance of its INPUT features on the group's channels.

    Returns:
        (feats, offsets): (group id, consumer) -> (mean (Tensor[n]), cov (Tensor[n, n]),
        samples), both float64; and (group id, consumer) -> channel offset.
    """
    offsets = consumer_offsets(graph, groups, widths)
    wanted: dict[str, list[tuple[int, int, int]]] = {}
    for (gid, cons), o in offsets.items():
        wanted.setdefault(cons, []).append((gid, o, widths[gid]))
    feats = {}
    hooks = []

    def make_hook(name):
        def hook(mod, inputs):
            x = inputs[0].detach()
            C = sum(widths[s] for s in graph.consumers[name].segments)
            if x.dim() == 2:  # linear input [N, C*B]: one sample per channel block
                v = x.reshape(x.shape[0], C, -1)
            else:  # conv input [N, C, H, W]: one sample per position
                v = x.flatten(2)
            N, _, P = v.shape
            total = N * P
            if total > max_samples:
                pick = torch.randperm(total, generator=generator)[:max_samples].to(x.device)
            else:
                pick = torch.arange(total, device=x.device)
            nb, pos = pick // P, pick % P
            for gid, o, n in wanted[name]:
                f = v[nb, o : o + n, pos]  # Tensor[samples, n] (no copy of the whole input)
                mu = f.double().mean(0)
                fc = f - mu.to(f.dtype)
                cov = (fc.T @ fc).double() / max(f.shape[0] - 1, 1)
                feats[(gid, name)] = (mu, cov, f.shape[0])

        return hook

    for name in wanted:
        hooks.append(modules[name].register_forward_pre_hook(make_hook(name)))
    was = model.training
    model.eval()
    try:
        model(*_as_args(data))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return feats, offsets


# ----------------------------------------------------------------------------------------------
# the whole resize: plan (compute everything), then commit


@dataclass
class _Entry:
    kind: str  # 'param' | 'buffer' | 'state'
    owner: object  # the Parameter, the module's _buffers dict, or the optimizer state dict
    key: object
    src: Tensor
    row: Tensor | None
    col: Tensor | None
    block: int


@dataclass
class Plan:
    entries: list[_Entry] = field(default_factory=list)
    attrs: list[tuple[object, str, object]] = field(default_factory=list)
    clear_grads: list[Tensor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@torch.no_grad()
def build_plan(modules: dict[str, nn.Module], graph: CouplingGraph, widths: dict[int, int], changes: dict[int, GroupChange], optimizer=None, generator=None) -> Plan:
    """Compute every new tensor source and index map of a resize (changes nothing).

    Args:
        modules: ``dict(model.named_modules())``. graph: the coupling graph.
        widths: current width per group id. changes: group id -> its :class:`GroupChange`
            (prunes already planned; grows get their new rows here).
        optimizer: whose state follows the parameters. generator: for grown rows.
    """
    plan = Plan()
    prod_of = {p: gid for gid in changes for p in changes[gid].group.producers}
    # grown rows
    growing = [(ch, p) for ch in changes.values() if ch.action == "grow" for p in ch.group.producers]
    if growing:  # singular values of every growing producer: one batched SVD call
        svs, _, _ = ops.batched_svd([producer_matrix(modules[p]).detach().double() for _, p in growing])
        for (ch, p), sv in zip(growing, svs):
            ch.rows[p] = grow_rows(producer_matrix(modules[p]), ch.new - ch.old, generator, sv)
    # modules touched: producers (rows) and consumers (columns) of changed groups
    touched = []
    for ch in changes.values():
        for name in ch.group.producers + ch.group.consumers:
            if name not in touched:
                touched.append(name)
    # running-mean corrections for consumers without a bias: norm name -> delta over its rows
    mean_delta: dict[str, Tensor] = {}
    params_resized: dict[Tensor, str] = {}
    pending = []  # (param, name, src, row_param, row_state, col, block)
    for name in touched:
        m = modules[name]
        if not isinstance(m, SUPPORTED):
            raise TypeError(f"cannot resize through module {name!r} of type {type(m).__name__}: only Conv2d and Linear are supported")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise TypeError(f"cannot resize through grouped convolution {name!r} (groups={m.groups})")
        W = m.weight.detach()
        R0 = W.shape[0]
        lay = graph.consumers.get(name)
        changing_cols = lay is not None and any(sg in changes for sg in lay.segments)
        B = weight_block(m, lay, widths) if changing_cols else int(math.prod(W.shape[2:]))
        work = None
        bias = m.bias.detach() if m.bias is not None else None
        bias_work = None
        row_p = row_s = None
        new_rows_count = R0
        gid = prod_of.get(name)
        if gid is not None:
            ch = changes[gid]
            if ch.action == "prune":
                K = ch.keep.to(W.device)
                if name in ch.rows:
                    work = W.clone()
                    work.reshape(R0, -1)[K] = ch.rows[name].to(W.dtype).to(W.device)
                row_p = row_s = K
                new_rows_count = len(K)
            else:
                a = ch.new - ch.old
                extra = ch.rows[name].to(W.dtype).to(W.device).reshape(a, *W.shape[1:])
                work = torch.cat([W, extra], 0)
                if bias is not None:
                    bias_work = torch.cat([bias, bias.new_zeros(a)])
                row_p = torch.arange(R0 + a, device=W.device)
                row_s = torch.cat([torch.arange(R0, device=W.device), torch.full((a,), -1, dtype=torch.long, device=W.device)])
                new_rows_count = R0 + a
        col = None
        C_new = None
        delta = None
        if changing_cols:
            parts = []
            o = 0
            if work is None:
                work = W.clone()
            Rw = work.shape[0]
            wv = work.reshape(Rw, -1, B)
            done_fold = set()
            for seg in lay.segments:
                n = widths[seg]
                ch = changes.get(seg)
                if ch is None:
                    parts.append(torch.arange(o, o + n, device=W.device))
                elif ch.action == "prune":
                    K = ch.keep.to(W.device)
                    Dn = ch.drop.to(W.device)
                    parts.append(o + K)
                    if name in ch.folds and (seg, name) not in done_fold:  # no fold: plain drop
                        M, c = ch.folds[name]
                        M = M.to(W.device)
                        c = c.to(W.device)
                        AD = wv[:, o + Dn, :].double()  # [R, |D|, B]
                        AK = wv[:, o + K, :].double()
                        wv[:, o + K, :] = (AK + torch.einsum("rdb,dk->rkb", AD, M)).to(W.dtype)
                        dlt = torch.einsum("rdb,d->r", AD, c)
                        delta = dlt if delta is None else delta + dlt
                        done_fold.add((seg, name))
                else:
                    a = ch.new - ch.old
                    parts.append(torch.cat([torch.arange(o, o + n, device=W.device), torch.full((a,), -1, dtype=torch.long, device=W.device)]))
                o += n
            col = torch.cat(parts)
            C_new = len(col)
        if delta is not None:
            if bias is not None:
                base = bias_work if bias_work is not None else bias
                bias_work = (base.double() + delta).to(bias.dtype)
            else:
                norm = None
                if gid is not None:
                    norm = norm_directly_after(changes[gid].group).get(name)
                else:
                    for g in graph.groups:
                        if name in g.producers:
                            norm = norm_directly_after(g).get(name)
                if norm is not None and getattr(modules[norm], "running_mean", None) is not None:
                    mean_delta[norm] = -delta
                elif float(delta.abs().max()) > 0:
                    plan.warnings.append(
                        f"consumer {name!r} has no bias and no BatchNorm right after it: the folded "
                        f"constant (max |delta| {float(delta.abs().max()):.3g}) was dropped"
                    )
        src = work if work is not None else W
        pending.append((m.weight, f"{name}.weight", src, row_p, row_s, col, B))
        params_resized[m.weight] = f"{name}.weight"
        if bias is not None and (row_p is not None or bias_work is not None):
            pending.append((m.bias, f"{name}.bias", bias_work if bias_work is not None else bias, row_p, row_s, None, 1))
            params_resized[m.bias] = f"{name}.bias"
        # attributes
        if isinstance(m, nn.Conv2d):
            if new_rows_count != R0:
                plan.attrs.append((m, "out_channels", new_rows_count))
            if C_new is not None:
                plan.attrs.append((m, "in_channels", C_new))
        else:
            if new_rows_count != R0:
                plan.attrs.append((m, "out_features", new_rows_count))
            if C_new is not None:
                plan.attrs.append((m, "in_features", C_new * B))
    # norms of changed groups
    for gid, ch in changes.items():
        for nm in ch.group.norms:
            bn = modules[nm]
            if not isinstance(bn, NORMS):
                raise TypeError(f"cannot resize norm {nm!r} of type {type(bn).__name__}: only BatchNorm is supported")
            dev = next(iter(list(bn.parameters()) + list(bn.buffers()))).device
            if ch.action == "prune":
                row_p = row_s = ch.keep.to(dev)
                a = 0
            else:
                a = ch.new - ch.old
                row_p = torch.arange(ch.new, device=dev)
                row_s = torch.cat([torch.arange(ch.old, device=dev), torch.full((a,), -1, dtype=torch.long, device=dev)])

            def ext(t, value):
                return torch.cat([t, t.new_full((a,), value)]) if a else t

            for pname, value in (("weight", 1.0), ("bias", 0.0)):
                p = getattr(bn, pname)
                if p is not None:
                    pending.append((p, f"{nm}.{pname}", ext(p.detach(), value), row_p, row_s, None, 1))
                    params_resized[p] = f"{nm}.{pname}"
            for bname, value in (("running_mean", 0.0), ("running_var", 1.0)):
                buf = bn._buffers.get(bname)
                if buf is not None:
                    src = ext(buf, value)
                    if bname == "running_mean" and nm in mean_delta:
                        src = (src.double() + mean_delta.pop(nm)).to(buf.dtype)
                    plan.entries.append(_Entry("buffer", bn._buffers, bname, src, row_p, None, 1))
            plan.attrs.append((bn, "num_features", ch.new))
    # running-mean corrections of norms whose group does not change
    for nm, dlt in mean_delta.items():
        buf = modules[nm]._buffers["running_mean"]
        plan.entries.append(_Entry("buffer", modules[nm]._buffers, "running_mean", (buf.double() + dlt).to(buf.dtype), None, None, 1))
    # optimizer state (checked before anything is touched; raises when it cannot be mapped)
    to_slice = state_to_slice(optimizer, params_resized)
    for p, pname, src, row_p, row_s, col, B in pending:
        plan.entries.append(_Entry("param", p, pname, src, row_p, col, B))
        plan.clear_grads.append(p)
        for k in to_slice.get(p, []):
            plan.entries.append(_Entry("state", optimizer.state[p], k, optimizer.state[p][k], row_s, col, B))
    return plan


def commit_plan(plan: Plan) -> None:
    """Make every new tensor (ONE slice_copy call), then assign them all through a rollback
    journal: either every assignment happens or none does."""
    e = plan.entries
    new = slice_copy([x.src for x in e], [x.row for x in e], [x.col for x in e], [x.block for x in e], None)
    computed = [(x, t) for x, t in zip(e, new) if x.kind != "state"]  # state: plain copies
    if computed and not bool(all_finite([t for _, t in computed])):
        bad = [x.key for x, t in computed if not torch.isfinite(t).all()]
        raise FloatingPointError(f"resize produced non-finite values for {bad}; nothing was changed")
    journal = Journal()
    try:
        for x, t in zip(e, new):
            if x.kind == "param":
                journal.param_data(x.owner, t)
            else:
                journal.setitem(x.owner, x.key, t)
        for obj, name, value in plan.attrs:
            journal.setattr(obj, name, value)
        for p in plan.clear_grads:
            if p.grad is not None:
                journal.setattr(p, "grad", None)
    except BaseException:
        journal.rollback()
        raise
