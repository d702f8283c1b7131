"""The resize step: stages 2-5 of docs/design.md (spectrum -> policy -> surgery -> optimizer
state) on a model traced once (stage 1).

Example::

    import torch
    from torch import nn
    from svdgrow import Policy, Resizer

    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.LeakyReLU(),
                          nn.Flatten(), nn.Linear(32 * 28 * 28, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rs = Resizer(model, torch.zeros(2, 1, 28, 28), policy=Policy(energy_eps=0.05), optimizer=opt)
    report = rs.step()           # analyse, decide, apply: same model, same optimizer
    print(report)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .compiled import after_resize, is_compiled, unwrap_compiled
from .cost import CostModel
from .policy import Decision, Policy
from .spectrum import GroupSpectrum, analyse_groups, feature_spectra, group_cap
from .surgery import (
    GroupChange,
    ResizeContext,
    build_plan,
    capture_features,
    check_finite,
    check_resizable,
    check_targets,
    commit_plan,
    consumer_input_sizes,
    data_pivot_gram,
    detect_activation,
    plan_prunes,
    prefer_measured,
)
from .trace import CouplingGraph, Group, trace

__all__ = ["Resizer", "StepReport"]

DETECT = object()  # Resizer(activation=...) default: read it from the model

logger = logging.getLogger(__name__)


@dataclass
class StepReport:
    """What one resize step did.

    Attributes:
        decisions: one :class:`Decision` per analysed (or explicitly resized) group.
        params_before: the model's parameter count before.
        params_after: its parameter count after.
        widths_before: group name -> width before.
        widths_after: group name -> width after.
        mode: the prune mode used (``"data"``, ``"weights"`` or ``"magnitude"``).
        cost_kind: the budget's measure, when a budget was used.
        cost_before: the cost before, when a budget was used.
        cost_after: the cost after, when a budget was used.
        budget: the budget, when one was used.
        flops_before: forward FLOPs per example input before, when a FLOPs ceiling was used
            beside a parameter budget.
        flops_after: the same after.
        flops_budget: that ceiling.
        warnings: approximations the surgery had to make (e.g. a dropped bias correction).
        seconds: time spent in 'analyse', 'decide', 'apply'.
        index: group name -> for every new channel, the old channel it came from (-1: grown),
            for the groups that changed (to remap anything else that follows the channels).
        fallbacks: group name -> why it was pruned another way than ``mode`` says
            (``mode="auto"`` without data: magnitude pruning where that was measured better on
            the example input than the weights-mode fold).
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
    flops_before: float | None = None
    flops_after: float | None = None
    flops_budget: float | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    index: dict[str, list[int]] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether any group changed width."""
        return any(d.action != "keep" for d in self.decisions)

    def as_dict(self) -> dict:
        """A JSON-able form (for logs)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"resize ({self.mode}): params {self.params_before:,} -> {self.params_after:,}"]
        if self.budget is not None:
            lines[0] += (
                f"; {self.cost_kind} {self.cost_before:.4g} -> {self.cost_after:.4g} "
                f"(budget {self.budget:.4g})"
            )
        if self.flops_budget is not None:
            lines[0] += (
                f"; flops {self.flops_before:.4g} -> {self.flops_after:.4g} "
                f"(budget {self.flops_budget:.4g})"
            )
        for d in self.decisions:
            lines.append(
                f"  {d.group:<28} {d.action:<5} {d.old_width:>5} -> {d.new_width:<5} {d.reason}"
            )
        lines.extend(f"  {g}: {why}" for g, why in self.fallbacks.items())
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


class Resizer:
    """Resize a model's widths in place during training, keeping its function and optimizer.

    Args:
        model: the network (Conv2d / Linear / BatchNorm layers are resized); a
            ``torch.compile`` wrapper is unwrapped (see :mod:`svdgrow.compiled`).
        example_input: an input (or a tuple of inputs) for tracing and FLOP counting.
        policy: the width :class:`Policy` (default ``Policy()``).
        optimizer: its per-parameter state follows every resize (the same object keeps working).
        mode: how a prune compensates for the dropped channels: ``"data"`` (a fold fitted on
            the batch passed to :meth:`step` / :meth:`apply`, on a convolution's im2col
            patches), ``"weights"`` (the same fold on moments predicted from the weights; no
            data), ``"auto"`` (``"data"`` when a batch is passed; else ``"weights"``, except
            where keeping the largest rows and folding nothing is measured better on
            ``example_input``: group by group on its consumers' outputs, then on the network's
            output; such groups are pruned by magnitude and the report's ``fallbacks`` and the
            log say why) or ``"magnitude"`` (keep the largest rows, fold nothing). See
            docs/design.md, "Stage 4: surgery".
        strict: passed to the tracer (refuse untraceable ops instead of freezing their groups).
        graph: a ready :class:`CouplingGraph` (skips tracing).
        seed: for grown directions and feature sub-sampling.
        ridge: relative ridge of the fold's least squares (``ridge * trace(S_KK) / r``).
        max_samples: feature vectors per consumer used by data mode (random positions).
        activation: the elementwise activation weights mode pushes its predicted
            pre-activations through; default: the model's, when it uses one kind of activation
            module (:func:`svdgrow.surgery.detect_activation`), else linear.
        spectrum: what the policy reads: ``"weights"`` (the singular values of each group's
            producer weights, scaled by the BatchNorm after them) or ``"features"`` (the
            eigenvalues of the covariance of what the group's consumers read on its channels,
            after BatchNorm and activation, measured on the batch passed to :meth:`step`,
            each consumer's channels weighted by the norms of the weight columns that read
            them: the matrix data mode's pivoted Cholesky chooses the kept channels from). The
            weight spectrum of a group is capped by its producers' input dimension (a
            3x3 stem on one input channel has rank 9 whatever its width); the feature
            spectrum is not: a resizer reading it grows a group past that cap (up to the
            feature samples its consumers were measured on), the channels past it with rows
            that are new only after the norm and the activation. See docs/design.md,
            "Stage 2: spectrum" and "Growth".
        hold_grown: for this many :meth:`step` calls after a group grows, it is not pruned
            below the width it grew to (by the energy rule or the budget). A grown channel
            starts with zero consumer columns, so a feature spectrum, which weighs channels
            by those columns, sees it as unused until training has given it a role; without
            a hold, a run that fills a budget can prune what it grew at the next step and
            grow it back at the one after. 0: no hold.
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
        spectrum: str = "weights",
        hold_grown: int = 0,
    ):
        if isinstance(hold_grown, bool) or int(hold_grown) != hold_grown or hold_grown < 0:
            raise ValueError(f"hold_grown must be an int >= 0 (resize steps), got {hold_grown!r}")
        if spectrum not in ("weights", "features"):
            raise ValueError(f"spectrum must be 'weights' or 'features', got {spectrum!r}")
        if spectrum == "features" and mode in ("weights", "magnitude"):
            raise ValueError(
                f"spectrum='features' is measured on a batch, which mode={mode!r} never takes: "
                "use mode='data' or 'auto' (and pass data to step())"
            )
        if mode not in ("auto", "weights", "data", "magnitude"):
            raise ValueError(f"mode must be 'auto', 'weights', 'data' or 'magnitude', got {mode!r}")
        self._compiled = is_compiled(model)  # torch.compile'd: resize the module it runs
        self.model = model = unwrap_compiled(model)
        self.example_input = example_input
        self.policy = policy if policy is not None else Policy()
        self.optimizer = optimizer
        self.mode = mode
        self.spectrum = spectrum
        self.strict = strict
        self.ridge = ridge
        self.max_samples = max_samples
        self.graph = graph if graph is not None else trace(model, example_input, strict=strict)
        # the draws of growth's random directions (a checkpoint saves and restores its state)
        self.generator = torch.Generator().manual_seed(seed)
        self.activation = detect_activation(model) if activation is DETECT else activation
        if self.activation is None and mode in ("auto", "weights") and activation is DETECT:
            logger.info("weights-mode folds are linear: no single activation module kind found")
        names = [g.name for g in self.graph.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"coupling graph has duplicate group names: {names}")
        self._frozen = {g.id: g.frozen for g in self.graph.groups if g.frozen is not None}
        modules = dict(model.named_modules())
        for g in self.graph.groups:
            why = None if g.id in self._frozen else check_resizable(modules, self.graph, g)
            if why is not None:
                if strict:
                    raise TypeError(f"group {g.name!r} cannot be resized: {why}")
                logger.warning("group %r frozen: %s", g.name, why)
                self._frozen[g.id] = why
        self._input_sizes: dict[str, tuple[int, int]] | None = None  # see _plan_prunes
        self._costs: dict[str, CostModel] = {}  # see cost()
        self.history: list[StepReport] = []
        self.hold_grown = int(hold_grown)
        #: group name -> (width it grew to, steps it is still held); see ``hold_grown``
        self.held: dict[str, tuple[int, int]] = {}
        #: group name -> its width when this Resizer was made: what
        #: ``Policy(allocation="uniform")`` keeps a common fraction of (a checkpoint keeps it)
        self.reference_widths: dict[str, int] = self.widths()

    # ------------------------------------------------------------------------------------------
    def context(self) -> ResizeContext:
        """The model now, as the surgery reads it (modules, graph, widths by group id)."""
        return ResizeContext.of(self.model, self.graph)

    def widths(self) -> dict[str, int]:
        """Current width of every group, by name."""
        return dict(
            zip((g.name for g in self.graph.groups), self.graph.widths(self.model), strict=True)
        )

    def param_count(self) -> int:
        """Number of parameters of the model now."""
        return sum(p.numel() for p in self.model.parameters())

    def resizable(self) -> list[Group]:
        """Groups that may be resized."""
        return [g for g in self.graph.groups if g.id not in self._frozen]

    def cost(self, kind: str | None = None) -> CostModel:
        """A :class:`CostModel` (``"params"`` or ``"flops"``) at the current widths.

        Built once per kind (for FLOPs, one counted forward pass on the example input) and
        evaluated at the current widths afterwards: every cost it counts scales linearly with
        the widths of the groups a layer reads and writes, so that is exact.

        Args:
            kind: ``"params"`` or ``"flops"`` (default: the policy's ``budget_kind``).
        """
        kind = kind or self.policy.budget_kind
        if kind not in self._costs:
            self._costs[kind] = CostModel(
                self.model, self.graph, self.widths(), kind, self.example_input
            )
        model = copy.copy(self._costs[kind])
        model.base = self.widths()
        return model

    # ------------------------------------------------------------------------------------------
    def analyse(
        self, groups: list[Group] | None = None, grams=None, data=None
    ) -> list[GroupSpectrum]:
        """Stage 2: the spectrum of every resizable group.

        Args:
            groups: the groups to analyse (default: every resizable group).
            grams: a dict to fill with the producers' Gram matrices formed on the way (see
                :func:`svdgrow.spectrum.analyse_groups`), for the same step's weights mode
                (``spectrum="weights"`` only).
            data: the batch a ``spectrum="features"`` resizer measures on (required there).

        Returns:
            one :class:`GroupSpectrum` per group: name, width, singular values, cumulative
            energy kept at each rank, and the input-dimension cap.

        Raises:
            ValueError: ``spectrum="features"`` without ``data``.
        """
        return self._analyse(groups, grams, data)[0]

    def _analyse(self, groups, grams, data):
        """:meth:`analyse`, and the features it measured (None with the weight spectrum), which
        the same step's data-mode fold reuses while the weights stay as they are."""
        groups = self.resizable() if groups is None else groups
        ctx = self.context()
        if self.spectrum == "weights":
            return analyse_groups(ctx.modules, groups, ctx.widths, grams), None
        if data is None:
            raise ValueError(
                "spectrum='features' reads each group's spectrum from a batch: pass data=... "
                "to step() (or analyse())"
            )
        feats = capture_features(ctx, groups, data, self.max_samples, self.generator)
        mats = [data_pivot_gram(ctx, g, *feats) for g in groups]
        samples = {}  # group id -> the fewest samples any of its consumers was measured on
        for (gid, _), m in feats[0].items():
            samples[gid] = min(samples.get(gid, m.count), m.count)
        caps = [max(group_cap(ctx.modules, g), samples.get(g.id, 0)) for g in groups]
        return feature_spectra(ctx.modules, groups, ctx.widths, mats, caps), feats

    def step(
        self,
        data=None,
        budget: float | None = None,
        flops_budget: float | None = None,
        before_change: Callable[[list[Decision]], None] | None = None,
    ) -> StepReport:
        """Analyse, decide and apply one resize (stages 2-5).

        Args:
            data: a batch (tensor or tuple) for ``mode="data"`` and ``spectrum="features"``.
            budget: overrides the policy's budget for this step (a shrinking schedule).
            flops_budget: overrides the policy's ``flops_budget`` (a second ceiling, forward
                FLOPs on the example input, beside a parameter budget) for this step.
            before_change: called with the step's decisions once the policy has decided to
                change a width and before any weight changes; not called by a step that keeps
                every width. For what must see the network as it was, paid only when it will
                change (a training loop's loss before the resize); an exception it raises
                ends the step with nothing changed.

        Returns:
            a :class:`StepReport`.

        Raises:
            FloatingPointError: non-finite weights (nothing changed).
        """
        t0 = time.perf_counter()
        check_finite(self.model)
        grams: dict = {}  # the producers' Gram matrices, valid until the weights change
        spectra, feats = self._analyse(None, grams, data)
        t1 = time.perf_counter()
        budget = self.policy.budget if budget is None else budget
        widths = self.widths()
        cost = self.cost(self.policy.budget_kind) if budget is not None else None
        flops_budget = self.policy.flops_budget if flops_budget is None else flops_budget
        flops = self.cost("flops") if flops_budget is not None else None
        hold = {name: w for name, (w, _) in self.held.items()}
        decisions = self.policy.decide(
            spectra, cost, widths, budget, flops, flops_budget, hold, self.reference_widths
        )
        t2 = time.perf_counter()
        new = {d.group: d.new_width for d in decisions if d.action != "keep"}
        if new and before_change is not None:
            before_change(decisions)
        report = self._resize(new, data, decisions, grams, feats)
        self._update_held(decisions)  # only once the resize went through
        t3 = time.perf_counter()
        if cost is not None:
            report.cost_kind = self.policy.budget_kind
            report.cost_before = cost(None)
            report.cost_after = cost({d.group: d.new_width for d in decisions})
            report.budget = float(budget)
        if flops is not None:
            report.flops_before = flops(None)
            report.flops_after = flops({d.group: d.new_width for d in decisions})
            report.flops_budget = float(flops_budget)
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
            KeyError: an unknown group.
            ValueError: a frozen group, a width below 1 or past the group's input-dimension
                cap, or an optimizer state that cannot follow.
            FloatingPointError: non-finite weights.
        """
        t0 = time.perf_counter()
        check_finite(self.model)
        report = self._resize(dict(new_widths), data, None)
        report.seconds = {"apply": time.perf_counter() - t0}
        self.history.append(report)
        return report

    def _update_held(self, decisions: list[Decision]) -> None:
        """Count down the holds and start one for every group that grows (``hold_grown``)."""
        self.held = {name: (w, left - 1) for name, (w, left) in self.held.items() if left > 1}
        if self.hold_grown:
            for d in decisions:
                if d.action == "grow":
                    self.held[d.group] = (d.new_width, self.hold_grown)

    # ------------------------------------------------------------------------------------------
    def _resize(
        self, new_widths: dict[str, int], data, decisions, grams=None, feats=None
    ) -> StepReport:
        """Stages 4-5 for ``new_widths``: plan the prunes and grows, build and commit."""
        ctx = self.context()
        widths_before, params_before = self.widths(), self.param_count()
        targets = check_targets(ctx, new_widths, self._frozen, self.spectrum == "features")
        mode = self.mode if self.mode != "auto" else ("data" if data is not None else "weights")
        prunes = {gid: w for gid, w in targets.items() if w < ctx.widths[gid]}
        changes = self._plan_prunes(ctx, mode, prunes, data, grams, feats)
        fallbacks = {ch.group.name: ch.note for ch in changes.values() if ch.note}
        for name, why in fallbacks.items():
            logger.info("group %r: %s", name, why)
        for gid, w in targets.items():
            if w > ctx.widths[gid]:
                changes[gid] = GroupChange(self.graph.groups[gid], ctx.widths[gid], w, "grow")
        warnings: list[str] = []
        if changes:
            plan = build_plan(ctx, changes, self.optimizer, self.generator)
            commit_plan(plan)
            warnings = plan.warnings
            if self._compiled:
                after_resize()  # drop graphs compiled for the old shapes (svdgrow.compiled)
        for w in warnings:
            logger.warning("%s", w)
        if decisions is None:
            decisions = [
                Decision(
                    ch.group.name, ch.old_width, ch.new_width, ch.action, "explicit width (apply)"
                )
                for ch in (changes[gid] for gid in targets)
            ]
        return StepReport(
            decisions=decisions,
            params_before=params_before,
            params_after=self.param_count(),
            widths_before=widths_before,
            widths_after=self.widths(),
            mode=mode,
            warnings=warnings,
            index={ch.group.name: _channel_index(ch) for ch in changes.values()},
            fallbacks=fallbacks,
        )

    def _plan_prunes(self, ctx, mode: str, prunes: dict[int, int], data, grams, feats=None):
        """Plan the prunes in ``mode``; ``mode="auto"`` without data measures the weights fold
        against magnitude pruning on the example input (:func:`svdgrow.surgery.prefer_measured`)."""
        if mode == "weights" and prunes and self._input_sizes is None:  # for padded convs
            names = list(self.graph.consumers)
            self._input_sizes = consumer_input_sizes(self.model, self.example_input, names)
        changes: dict[int, GroupChange] = plan_prunes(
            mode,
            ctx,
            prunes,
            data=data,
            activation=self.activation,
            ridge=self.ridge,
            max_samples=self.max_samples,
            generator=self.generator,
            input_sizes=self._input_sizes,
            grams=grams,
            features=feats,
        )
        if self.mode == "auto" and mode == "weights" and changes:
            magnitude = plan_prunes("magnitude", ctx, prunes)
            changes = prefer_measured(ctx, changes, magnitude, self.example_input)
        return changes


def _channel_index(ch: GroupChange) -> list[int]:
    """For every channel after the change, the channel it came from (-1: grown)."""
    if ch.action == "prune":
        return ch.keep.tolist()
    return list(range(ch.old_width)) + [-1] * (ch.new_width - ch.old_width)
