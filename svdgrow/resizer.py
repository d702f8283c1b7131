"""The resize step: trace -> spectrum -> policy -> surgery -> optimizer remap (DESIGN.md).

Example::

    import torch
    from torch import nn
    from svdgrow.resizer import Resizer
    from svdgrow.policy import Policy

    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.LeakyReLU(),
                          nn.Flatten(), nn.Linear(32 * 28 * 28, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rs = Resizer(model, torch.zeros(1, 1, 28, 28), policy=Policy(energy_eps=0.05), optimizer=opt)
    report = rs.step()           # analyse, decide, apply: same model, same optimizer
    print(report)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .policy import Decision, Policy
from .spectrum import GroupSpectrum, analyse_groups, input_dim
from .surgery import (
    NORMS,
    SUPPORTED,
    GroupChange,
    build_plan,
    capture_features,
    all_finite,
    commit_plan,
    data_pivot_gram,
    pivoted_cholesky_batched,
    plan_prune_data,
    plan_prune_magnitude,
    predict_features,
    detect_activation,
)
from .trace import CouplingGraph, Group

__all__ = ["Resizer", "StepReport", "CostModel"]

DETECT = object()  # Resizer(activation=...) default: read it from the model

logger = logging.getLogger(__name__)


@dataclass
class StepReport:
    """What one resize step did.

    Attributes:
        decisions: one :class:`Decision` per analysed (or explicitly resized) group.
        params_before, params_after: parameter counts of the model.
        widths_before, widths_after: group name -> width.
        cost_kind, cost_before, cost_after, budget: the budget's measure when one was used.
        warnings: approximations the surgery had to make (e.g. a dropped bias correction).
        seconds: time spent in 'analyse', 'decide', 'apply'.
        index: group name -> for every new channel, the old channel it came from (-1: grown),
            for the groups that changed (to remap anything else that follows the channels).
    """

    decisions: list[Decision]
    params_before: int
    params_after: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    mode: str = "weights"
    cost_kind: str | None = None
    cost_before: float | None = None
    cost_after: float | None = None
    budget: float | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    index: dict[str, list[int]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(d.action != "keep" for d in self.decisions)

    def as_dict(self) -> dict:
        """A JSON-able form (for logs)."""
        return {
            "decisions": [d.__dict__.copy() for d in self.decisions],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "widths_before": dict(self.widths_before),
            "widths_after": dict(self.widths_after),
            "mode": self.mode,
            "cost_kind": self.cost_kind,
            "cost_before": self.cost_before,
            "cost_after": self.cost_after,
            "budget": self.budget,
            "warnings": list(self.warnings),
            "seconds": dict(self.seconds),
            "index": {k: list(v) for k, v in self.index.items()},
        }

    def __str__(self) -> str:
        lines = [f"resize ({self.mode}): params {self.params_before:,} -> {self.params_after:,}"]
        if self.budget is not None:
            lines[0] += f"; {self.cost_kind} {self.cost_before:.4g} -> {self.cost_after:.4g} (budget {self.budget:.4g})"
        for d in self.decisions:
            lines.append(f"  {d.group:<28} {d.action:<5} {d.old_width:>5} -> {d.new_width:<5} {d.reason}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


class CostModel:
    """Cost of the network (parameters or forward FLOPs) as a function of group widths.

    Every Conv2d/Linear weight scales as ``rows * channels`` (its FLOPs too), a bias with its
    rows, a BatchNorm's affine parameters with its width; everything else is constant. Exact
    for parameters; for FLOPs exact for the convolutions and linears
    (``torch.utils.flop_counter.FlopCounterMode`` on the example input, per module).
    """

    def __init__(self, model: nn.Module, graph: CouplingGraph, widths: dict[str, int], kind: str = "params", example_input=None):
        self.kind = kind
        mods = dict(model.named_modules())
        self._terms = []  # (rows group name | None, segments names | None, a, rows0, cols0, bias)
        prod_of = {p: g.name for g in graph.groups for p in g.producers}
        names = {g.id: g.name for g in graph.groups}
        involved = set(prod_of) | set(graph.consumers)
        flops = None
        if kind == "flops":
            from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

            args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
            was = model.training
            model.eval()
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as fc:
                    model(*args)
            finally:
                model.train(was)
            counts = fc.get_flop_counts()
            root = type(model).__name__
            flops = {k: sum(v.values()) for k, v in counts.items()}
            total = float(flops.get("Global", 0))
        else:
            total = float(sum(p.numel() for p in model.parameters()))
        variable = 0.0
        for name in sorted(involved):
            m = mods[name]
            W = m.weight
            rows0 = W.shape[0]
            lay = graph.consumers.get(name)
            segs = [names[s] for s in lay.segments] if lay is not None and name in graph.consumers else None
            cols0 = sum(widths[s] for s in segs) if segs else None
            if not cols0:
                segs = None
            if kind == "flops":
                key = f"{root}.{name}" if name else root
                a = float(flops.get(key, 0))
                bias = 0.0
            else:
                a = float(W.numel())
                bias = float(m.bias.numel()) if getattr(m, "bias", None) is not None else 0.0
            self._terms.append((prod_of.get(name), segs, a, rows0, cols0, bias))
            variable += a + bias
        self._norms = []
        if kind == "params":
            for g in graph.groups:
                if g.name not in widths:
                    continue
                for nm in g.norms:
                    k = sum(1 for p in (getattr(mods[nm], "weight", None), getattr(mods[nm], "bias", None)) if p is not None)
                    if k:
                        self._norms.append((g.name, k))
                        variable += k * widths[g.name]
        self.const = total - variable
        self.base = dict(widths)

    def __call__(self, widths: dict[str, int]) -> float:
        w = self.base if widths is None else {**self.base, **widths}
        total = self.const
        for rows_g, segs, a, rows0, cols0, bias in self._terms:
            rf = w[rows_g] / rows0 if rows_g is not None else 1.0
            cf = sum(w[s] for s in segs) / cols0 if segs else 1.0
            total += a * rf * cf + bias * rf
        for g, k in self._norms:
            total += k * w[g]
        return total


class Resizer:
    """Resize a model's widths in place during training, keeping its function and optimizer.

    Args:
        model: the network (Conv2d / Linear / BatchNorm layers are resized).
        example_input: an input (or a tuple of inputs) for tracing and FLOP counting.
        policy: the width :class:`Policy` (default ``Policy()``).
        optimizer: its per-parameter state follows every resize (the same object keeps working).
        mode: how a prune compensates for the dropped channels. ``"data"``: a fold fitted on
            the consumers' input features of the batch passed to :meth:`step` / :meth:`apply`
            (the best on trained networks, see README "Pruning quality"); ``"weights"``: the
            same fold on moments predicted from the weights and BatchNorm statistics, pushed
            through the model's activation (no data; exact through linear maps up to the
            ridge); ``"auto"`` (default): ``"data"`` when a batch is passed, else
            ``"weights"``; ``"magnitude"``: a baseline that keeps the largest rows and folds
            nothing.
        strict: passed to the tracer (refuse untraceable ops instead of freezing their groups).
        graph: a ready :class:`CouplingGraph` (skips tracing).
        seed: for grown directions and feature sub-sampling.
        ridge: relative ridge of the fold's least squares (``ridge * trace(S_KK) / r``).
        activation: the elementwise activation weights mode pushes its predicted
            pre-activations through; default: the model's, when it uses one kind of activation
            module (:func:`svdgrow.surgery.detect_activation`), else linear.
        max_samples: feature vectors per consumer used by data mode (random positions).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input,
        policy: Policy | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        mode: str = "auto",
        strict: bool = False,
        graph: CouplingGraph | None = None,
        seed: int = 0,
        ridge: float = 1e-3,
        max_samples: int = 16384,
        activation=DETECT,
    ):
        if mode not in ("auto", "weights", "data", "magnitude"):
            raise ValueError(f"mode must be 'auto', 'weights', 'data' or 'magnitude', got {mode!r}")
        self.model = model
        self.example_input = example_input
        self.policy = policy if policy is not None else Policy()
        self.optimizer = optimizer
        self.mode = mode
        self.strict = strict
        self.ridge = ridge
        self.max_samples = max_samples
        if graph is None:
            from .trace import trace  # noqa: PLC0415

            graph = trace(model, example_input, strict=strict)
        self.graph = graph
        self._gen = torch.Generator().manual_seed(seed)
        self._mods = dict(model.named_modules())
        self.activation = detect_activation(model) if activation is DETECT else activation
        if self.activation is None and mode in ("auto", "weights") and activation is DETECT:
            logger.info("weights-mode folds are linear: no single activation module kind found in the model")
        names = [g.name for g in graph.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"coupling graph has duplicate group names: {names}")
        self._by_name = {g.name: g for g in graph.groups}
        self._frozen = {g.id: g.frozen for g in graph.groups if g.frozen is not None}
        for g in graph.groups:
            if g.id in self._frozen:
                continue
            why = self._unsupported(g)
            if why is not None:
                if strict:
                    raise TypeError(f"group {g.name!r} cannot be resized: {why}")
                logger.warning("group %r frozen: %s", g.name, why)
                self._frozen[g.id] = why
        self.history: list[StepReport] = []

    # ------------------------------------------------------------------------------------------
    def _unsupported(self, g: Group) -> str | None:
        if not g.producers:
            return "it has no producer (model input)"
        for name in g.producers + g.consumers:
            m = self._mods.get(name)
            if m is None:
                return f"module {name!r} is not in the model"
            if not isinstance(m, SUPPORTED):
                return f"module {name!r} is a {type(m).__name__} (only Conv2d and Linear are supported)"
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                return f"module {name!r} is a grouped convolution (groups={m.groups})"
        for name in g.consumers:
            if name not in self.graph.consumers:
                return f"consumer {name!r} has no layout in the coupling graph"
        for nm in g.norms:
            if not isinstance(self._mods.get(nm), NORMS):
                return f"norm {nm!r} is not a BatchNorm"
        return None

    def _width(self, g: Group) -> int | None:
        if g.producers:
            return int(self._mods[g.producers[0]].weight.shape[0])
        if g.norms:
            return int(self._mods[g.norms[0]].num_features)
        return None

    def _widths_by_id(self) -> dict[int, int]:
        out = {}
        for g in self.graph.groups:
            w = self._width(g)
            if w is None:  # an input group: the traced width, else a consumer reading only it
                w = getattr(g, "width", None)
                for c, lay in self.graph.consumers.items():
                    if w is None and lay.segments == [g.id]:
                        m = self._mods[c]
                        w = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features // max(lay.block, 1)
            out[g.id] = w if w is not None else 0
        return out

    def widths(self) -> dict[str, int]:
        """Current width of every group, by name."""
        wid = self._widths_by_id()
        return {g.name: wid[g.id] for g in self.graph.groups}

    def param_count(self) -> int:
        """Number of parameters of the model now."""
        return sum(p.numel() for p in self.model.parameters())

    def resizable(self) -> list[Group]:
        """Groups that may be resized."""
        return [g for g in self.graph.groups if g.id not in self._frozen]

    def cost(self, kind: str | None = None) -> CostModel:
        """A :class:`CostModel` (``"params"`` or ``"flops"``) at the current widths."""
        kind = kind or self.policy.budget_kind
        return CostModel(self.model, self.graph, self.widths(), kind, self.example_input)

    # ------------------------------------------------------------------------------------------
    def _check_finite(self) -> None:
        tensors = [p for p in self.model.parameters()] + [b for b in self.model.buffers() if b.is_floating_point()]
        if bool(all_finite(tensors)):
            return
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError(
                    f"parameter {name!r} holds NaN/inf: refusing to resize (nothing was changed). "
                    "Lower the learning rate or clip gradients, or reload a checkpoint."
                )
        for name, b in self.model.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise FloatingPointError(f"buffer {name!r} holds NaN/inf: refusing to resize (nothing was changed)")

    def analyse(self, groups: list[Group] | None = None) -> list[GroupSpectrum]:
        """Spectrum of every resizable group (one batched SVD for all).

        Returns:
            one :class:`GroupSpectrum` per resizable group: name, width, singular values,
            cumulative energy kept at each rank, and the input-dimension cap.
        """
        groups = self.resizable() if groups is None else groups
        return analyse_groups(self._mods, self.graph, groups, self._widths_by_id())

    def step(self, data=None, budget: float | None = None) -> StepReport:
        """Analyse, decide and apply one resize.

        Args:
            data: a batch (tensor or tuple) for ``mode="data"``.
            budget: overrides the policy's budget for this step (a shrinking schedule).

        Returns:
            a :class:`StepReport`.

        Raises:
            FloatingPointError: non-finite weights (nothing changed).
        """
        t0 = time.perf_counter()
        self._check_finite()
        spectra = self.analyse()
        t1 = time.perf_counter()
        budget = self.policy.budget if budget is None else budget
        cost = None
        widths = self.widths()
        if budget is not None:
            cost = self.cost(self.policy.budget_kind)
        decisions = self.policy.decide(spectra, cost, widths, budget)
        t2 = time.perf_counter()
        new = {d.group: d.new_width for d in decisions if d.action != "keep"}
        report = self._apply(new, data, decisions)
        t3 = time.perf_counter()
        if cost is not None:
            report.cost_kind = self.policy.budget_kind
            report.cost_before = cost(None)
            report.cost_after = cost({d.group: d.new_width for d in decisions})
            report.budget = float(budget)
        report.widths_before = widths
        report.seconds = {"analyse": t1 - t0, "decide": t2 - t1, "apply": t3 - t2}
        self.history.append(report)
        logger.info("%s", report)
        return report

    def apply(self, new_widths: dict[str, int], data=None) -> StepReport:
        """Resize groups to explicit widths (prune with folding, or grow).

        Args:
            new_widths: group name -> new width (groups left out keep theirs).
            data: a batch for ``mode="data"`` prunes.

        Raises:
            KeyError: an unknown group. ValueError: a frozen group, a width below 1 or past
            the group's input-dimension cap, or an optimizer state that cannot follow.
            FloatingPointError: non-finite weights. In every case nothing was changed.
        """
        t0 = time.perf_counter()
        self._check_finite()
        report = self._apply(dict(new_widths), data, None)
        report.seconds = {"apply": time.perf_counter() - t0}
        self.history.append(report)
        return report

    # ------------------------------------------------------------------------------------------
    def _apply(self, new_widths, data, decisions) -> StepReport:
        wid = self._widths_by_id()
        widths_before = self.widths()
        params_before = self.param_count()
        changes_w: dict[int, int] = {}
        for name, w in new_widths.items():
            if name not in self._by_name:
                raise KeyError(f"unknown group {name!r}; groups: {sorted(self._by_name)}")
            g = self._by_name[name]
            if isinstance(w, bool) or int(w) != w:
                raise ValueError(f"group {name!r}: width must be an int, got {w!r}")
            w = int(w)
            if w == wid[g.id]:
                continue
            if g.id in self._frozen:
                raise ValueError(f"group {name!r} is frozen and cannot be resized: {self._frozen[g.id]}")
            if w < 1:
                raise ValueError(f"group {name!r}: width {w} < 1; widths never reach 0")
            if w > wid[g.id]:
                cap = min(input_dim(self._mods[p]) for p in g.producers)
                if w > cap:
                    raise ValueError(
                        f"group {name!r}: width {w} is past its cap {cap} (the input dimension in*kh*kw "
                        f"of its producers {g.producers}); new directions cannot be orthogonal beyond it"
                    )
            changes_w[g.id] = w
        warnings: list[str] = []
        changes: dict[int, GroupChange] = {}
        prunes = [gid for gid, w in changes_w.items() if w < wid[gid]]
        mode = self.mode if self.mode != "auto" else ("data" if data is not None else "weights")
        if prunes and mode == "magnitude":
            for gid in prunes:
                changes[gid] = plan_prune_magnitude(self._mods, self.graph.groups[gid], wid[gid], changes_w[gid])
        elif prunes:
            # both folds are one least-squares fit on the consumers' input moments: measured on
            # the batch (data mode) or predicted from the weights and norm statistics (weights)
            groups = [self.graph.groups[gid] for gid in prunes]
            if mode == "data":
                if data is None:
                    raise ValueError("mode='data' prunes need a batch: pass data=... to step() or apply()")
                feats, offsets = capture_features(self.model, self._mods, self.graph, groups, wid, data, self.max_samples, self._gen)
            else:
                feats, offsets = predict_features(self._mods, self.graph, groups, wid, self.activation, generator=self._gen)
            grams = [data_pivot_gram(self._mods, self.graph, g, wid, feats, offsets) for g in groups]
            pivots = pivoted_cholesky_batched(grams, [changes_w[gid] for gid in prunes])
            for g, piv in zip(groups, pivots):
                changes[g.id] = plan_prune_data(self._mods, self.graph, g, wid, changes_w[g.id], feats, self.ridge, offsets, piv)
        for gid, w in changes_w.items():
            if w > wid[gid]:
                changes[gid] = GroupChange(self.graph.groups[gid], wid[gid], w, "grow")
        if changes:
            plan = build_plan(self._mods, self.graph, wid, changes, self.optimizer, self._gen)
            commit_plan(plan)
            warnings.extend(plan.warnings)
        for w in warnings:
            logger.warning("%s", w)
        index = {}
        for gid, ch in changes.items():
            if ch.action == "prune":
                index[ch.group.name] = ch.keep.tolist()
            else:
                index[ch.group.name] = list(range(ch.old)) + [-1] * (ch.new - ch.old)
        if decisions is None:
            decisions = [
                Decision(
                    self.graph.groups[gid].name,
                    wid[gid],
                    changes_w[gid],
                    "prune" if changes_w[gid] < wid[gid] else "grow",
                    "explicit width (apply)",
                )
                for gid in changes_w
            ]
        return StepReport(
            decisions=decisions,
            params_before=params_before,
            params_after=self.param_count(),
            widths_before=widths_before,
            widths_after=self.widths(),
            mode=mode,
            warnings=warnings,
            index=index,
        )
