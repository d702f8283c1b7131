"""Stage 3, the width policy: spectra -> a width per group (prune to the energy rank, grow when
every direction is strong, fit an optional parameter/FLOP budget network-wide), each decision
with a reason that states its numbers; and the budget schedule :func:`budget_at`.
See docs/design.md, "Stage 3: policy".
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .spectrum import GroupSpectrum

__all__ = ["ALLOCATIONS", "Decision", "Policy", "budget_at"]

#: What :class:`Policy` may allocate widths by (its ``allocation``).
ALLOCATIONS = ("spectrum", "uniform")


@dataclass
class Decision:
    """What the policy decided for one group.

    Attributes:
        group: the group's name.
        old_width: its channels before.
        new_width: its channels after.
        action: ``'prune'``, ``'grow'`` or ``'keep'``.
        reason: why, with the numbers.
    """

    group: str
    old_width: int
    new_width: int
    action: str
    reason: str


@dataclass
class Policy:
    """How widths move (see the module docstring).

    Args:
        energy_eps: energy fraction a prune may drop (keep ``>= 1 - energy_eps``).
        min_width: floor on every width (at least 1).
        grow_threshold: grow when ``sigma_min**2 / mean(sigma**2)`` reaches it.
        grow_fraction: grow by ``ceil(n * grow_fraction)`` channels.
        max_prune_fraction: at most this fraction of a group's channels goes per step.
        budget: optional ceiling on the network's cost (parameters or FLOPs).
        budget_kind: ``"params"`` or ``"flops"`` (forward FLOPs on the example input).
        flops_budget: optional second ceiling, on forward FLOPs per example input, that the
            widths must fit as well as a ``budget_kind="params"`` budget: the cut then weighs
            each channel by what it saves of every ceiling still exceeded, each relative to
            its ceiling.
        fill_budget: treat the budget as a size to reach, not only a ceiling: after the grow
            options, every group that needs all its directions (none pruned this step) and is
            below its cap grows too, by up to ``ceil(n * grow_fraction)``, the group with the
            highest ``sigma_min**2 / mean(sigma**2)`` first, while every cost stays within its
            ceiling (a group takes fewer channels when the full step would not fit). Without
            it a growing run stops growing once no spectrum reaches ``grow_threshold``, below
            its budget. With it, growth also goes strictly in order of need: a grow option
            or fill that does not fit whole takes what fits and the weaker ones wait for the
            next step (without it they skip ahead, so a cheap group can take every rise of a
            budget while an expensive one, a residual stream, never fits). No effect without
            a budget.
        allocation: ``"spectrum"`` (the rules above) or ``"uniform"``, a baseline that never
            reads a spectrum: no energy-rule prunes and no grow options; a budget is met by
            cutting one channel at a time from the group that keeps the largest fraction of its
            reference width (the widths the :class:`~svdgrow.Resizer` started from), so every
            group keeps the same fraction to within a channel, and with ``fill_budget`` it is
            filled likewise, the smallest fraction first (within each group's cap). Which
            channels go is still the surgery's choice (the fold's pivots in data and weights
            mode). For measuring what the spectra add to a shrinking schedule
            (docs/design.md, "Stage 3: policy").
        round_to: every width the policy moves a group to is a multiple of this (or the
            group's cap). Convolution kernels work on blocks of channels (8 or 16 on CPUs with
            AVX-512, 8 for GPU tensor cores), so a layer of 17 channels can train slower than
            one of 24: ``benchmarks/bench_widths.py`` measures it. A prune goes to a multiple
            below (rounded up from the energy rule's rank), a grow to a multiple above; a group
            keeps a width that is not a multiple until it moves, and one at or below
            ``round_to`` channels is not pruned. A budget is met in blocks: the cut removes a
            block at a time (down to the next multiple), then gives back, most energy per unit
            of cost first, the blocks that still fit. 1 (the default): any width.
        align: with ``round_to > 1``, move every group whose width is not a multiple (and is
            above ``round_to`` and below its cap) to one this step, even when no rule moves
            it: first down to the multiple below (never below its floor), then, after the
            budget's cut and the grow options, back up to the multiple above its width (past
            it a grow) while every cost stays within its ceiling, most energy given back per
            unit of cost first. For aligning once, e.g. when a budget schedule that ran on
            free widths ends (``svdgrow train --round-after-shrink``). Ignored with
            ``allocation="uniform"``.
    """

    energy_eps: float = 1e-2
    min_width: int = 2
    grow_threshold: float = 0.5
    grow_fraction: float = 0.25
    max_prune_fraction: float = 0.5
    budget: float | None = None
    budget_kind: str = "params"
    flops_budget: float | None = None
    fill_budget: bool = False
    allocation: str = "spectrum"
    round_to: int = 1
    align: bool = False

    def __post_init__(self):
        if not 0.0 <= self.energy_eps < 1.0:
            raise ValueError(f"energy_eps must be in [0, 1), got {self.energy_eps}")
        if int(self.min_width) < 1:
            raise ValueError(f"min_width must be >= 1 (widths never reach 0), got {self.min_width}")
        if self.grow_threshold < 0:
            raise ValueError(f"grow_threshold must be >= 0, got {self.grow_threshold}")
        if not 0.0 <= self.grow_fraction:
            raise ValueError(f"grow_fraction must be >= 0, got {self.grow_fraction}")
        if not 0.0 <= self.max_prune_fraction <= 1.0:
            raise ValueError(f"max_prune_fraction must be in [0, 1], got {self.max_prune_fraction}")
        if self.budget_kind not in ("params", "flops"):
            raise ValueError(f"budget_kind must be 'params' or 'flops', got {self.budget_kind!r}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be positive or None, got {self.budget}")
        if self.flops_budget is not None and self.flops_budget <= 0:
            raise ValueError(f"flops_budget must be positive or None, got {self.flops_budget}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))}, "
                f"got {self.allocation!r}"
            )
        if (
            isinstance(self.round_to, bool)
            or int(self.round_to) != self.round_to
            or self.round_to < 1
        ):
            raise ValueError(
                f"round_to must be a whole number >= 1 (1: any width), got {self.round_to!r}"
            )
        self.round_to = int(self.round_to)
        if self.align and self.round_to == 1:
            raise ValueError("align=True moves widths to multiples of round_to: give round_to > 1")
        if self.flops_budget is not None and self.budget_kind != "params":
            raise ValueError(
                "flops_budget is a second ceiling beside a parameter budget; with "
                "budget_kind='flops' set budget instead"
            )

    # ------------------------------------------------------------------------------------------
    def floor(self, n: int) -> int:
        """Lowest width a group of ``n`` channels may reach this step."""
        step = max(1, math.floor(n * self.max_prune_fraction)) if self.max_prune_fraction > 0 else 0
        low = min(n, max(int(self.min_width), 1, n - step))
        return low if low == n else min(n, self._up(low))

    def _up(self, w: int) -> int:
        """Smallest multiple of ``round_to`` at or above ``w``."""
        return -(-w // self.round_to) * self.round_to

    def _below(self, w: int) -> int:
        """The next width a cut may take a group of ``w`` channels to (0: none)."""
        return (w - 1) // self.round_to * self.round_to

    def _grown(self, n: int, add: int, cap: int) -> int:
        """Channels to add to a group of ``n``, at least ``add``, for a width that is a
        multiple of ``round_to`` (or the cap)."""
        return min(cap, self._up(n + add)) - n if add > 0 else 0

    def decide(
        self,
        spectra: list[GroupSpectrum],
        cost: Callable[[dict[str, int]], float] | None = None,
        widths: dict[str, int] | None = None,
        budget: float | None = None,
        flops_cost: Callable[[dict[str, int]], float] | None = None,
        flops_budget: float | None = None,
        hold: dict[str, int] | None = None,
        reference: dict[str, int] | None = None,
    ) -> list[Decision]:
        """Decide a width for every analysed group.

        Args:
            spectra: from :meth:`svdgrow.Resizer.analyse`.
            cost: ``cost(widths by group name) -> float`` of the whole network in
                ``budget_kind`` (needed with a budget).
            widths: the current widths of all groups (needed with a budget).
            budget: overrides ``self.budget`` for this step.
            flops_cost: the network's forward FLOPs as a function of the widths (needed with a
                FLOPs ceiling).
            flops_budget: overrides ``self.flops_budget`` for this step.
            hold: group name -> a width it may not be pruned below this step (neither by the
                energy rule nor by the budget's cut), e.g. the width a group grew to a few
                resizes ago (:class:`~svdgrow.Resizer`'s ``hold_grown``).
            reference: ``allocation="uniform"``: group name -> the width its kept fraction is
                measured against (the Resizer passes the widths it started from); a group
                left out is measured against its current width.

        Returns:
            one :class:`Decision` per spectrum, in order.
        """
        budget = self.budget if budget is None else budget
        flops_budget = self.flops_budget if flops_budget is None else flops_budget
        ceilings = []
        if budget is not None:
            ceilings.append((self.budget_kind, cost, float(budget)))
        if flops_budget is not None:
            ceilings.append(("flops", flops_cost, float(flops_budget)))
        draft = _Draft()
        for s in spectra:
            draft.floors[s.name] = max(
                self.floor(s.width), min(s.width, (hold or {}).get(s.name, 0))
            )
            if self.allocation == "uniform":
                draft.target[s.name] = s.width
                draft.reasons[s.name] = "allocation='uniform': spectrum not read"
            else:
                self._decide_group(s, draft)
        if ceilings and (any(fn is None for _, fn, _ in ceilings) or widths is None):
            raise ValueError("a budget needs a cost function and the current widths")
        if not ceilings:
            for _, name, w, _ in draft.grows:
                draft.target[name] = w
        if self.allocation == "uniform":
            if ceilings:
                self._fit_uniform(spectra, draft, ceilings, {**widths}, reference or {})
        else:
            down = self._align_down(spectra, draft) if self.align and self.round_to > 1 else {}
            plan = {**(widths or {}), **draft.target}
            if ceilings:
                self._fit_budget(spectra, draft, ceilings, plan)
            if down:
                self._align_up(spectra, draft, ceilings, plan, down)
        out = []
        for s in spectra:
            w = draft.target[s.name]
            action = "prune" if w < s.width else "grow" if w > s.width else "keep"
            out.append(Decision(s.name, s.width, w, action, draft.reasons[s.name]))
        return out

    # ------------------------------------------------------------------------------------------
    def _decide_group(self, s: GroupSpectrum, draft: _Draft) -> None:
        """The energy rule for one group: a prune target, a keep, or a grow option."""
        eps = self.energy_eps
        n = s.width
        floor = draft.floors[s.name]
        rank = s.rank_for(eps)
        if rank < n:
            kept = float(s.energy_kept[rank - 1]) if s.energy_kept.numel() else 1.0
            r = max(rank, floor)
            msg = f"energy kept at rank {rank}: {kept:.6f} >= {1 - eps:.6f} (eps={eps:g})"
            if r > rank:
                if r > self.floor(n):
                    why = "hold (grown a few resizes ago)"
                elif r == max(int(self.min_width), 1):
                    why = f"min_width={self.min_width}"
                elif r == self.round_to or r == n:
                    why = f"round_to={self.round_to}"
                else:
                    why = f"max_prune_fraction={self.max_prune_fraction:g}"
                    if self.round_to > 1:
                        why += f", rounded up to a multiple of round_to={self.round_to}"
                kept_r = float(s.energy_kept[min(r, s.energy_kept.numel()) - 1])
                msg += f"; limited to {r} by {why} (energy kept {kept_r:.6f})"
            if self.round_to > 1 and r % self.round_to and r < n:
                up = min(n, self._up(r))
                msg += f"; rounded up to {up} (round_to={self.round_to})"
                r = up
            draft.target[s.name] = r
            draft.reasons[s.name] = msg
            return
        sv = s.singular_values[:n]
        share = float(sv[-1] ** 2 / (sv.pow(2).mean())) if s.total_energy > 0 else 0.0
        draft.target[s.name] = n
        if share >= self.grow_threshold and n < s.cap and self.grow_fraction > 0:
            add = self._grown(n, min(math.ceil(n * self.grow_fraction), s.cap - n), s.cap)
            below = float(s.energy_kept[n - 2]) if n > 1 else 0.0
            msg = (
                f"all {n} directions needed (energy at rank {n - 1}: {below:.6f} < "
                f"{1 - eps:.6f}); sigma_min^2/mean(sigma^2)={share:.4f} >= "
                f"grow_threshold={self.grow_threshold:g}; +{add} "
                f"(grow_fraction={self.grow_fraction:g}, cap {s.cap})"
            )
            draft.grows.append((-share, s.name, n + add, msg))
            draft.reasons[s.name] = msg
        else:
            if n >= s.cap:
                why = f"at cap {s.cap}"
            else:
                why = (
                    f"sigma_min^2/mean(sigma^2)={share:.4f} < "
                    f"grow_threshold={self.grow_threshold:g}"
                )
                if self.fill_budget and self.grow_fraction > 0:
                    add = self._grown(n, min(math.ceil(n * self.grow_fraction), s.cap - n), s.cap)
                    draft.fills.append((-share, s.name, n, add))
            draft.reasons[s.name] = f"all {n} directions needed (eps={eps:g}); {why}"

    def _fit_budget(self, spectra, draft: _Draft, ceilings, plan: dict[str, int]):
        """Bring the planned widths under every ceiling, then take the grow options that fit.

        While a cost exceeds its ceiling, one more channel is removed network-wide from the
        group that loses the least relative energy per unit of cost saved (each cost still
        above its ceiling counted relative to that ceiling; with one ceiling, per unit of that
        cost), via a lazy heap: a popped score is recomputed and pushed back when it went
        stale; never below a group's :meth:`floor`. Grow options are then taken, strongest
        first, while every cost stays within its ceiling (one that does not fit is skipped;
        with ``fill_budget`` it takes what fits and the rest wait, then the fills likewise).

        Args:
            spectra: the analysed groups.
            draft: the energy rule's targets, reasons and grow options; updated in place.
            ceilings: ``(kind, cost function of all widths, ceiling)`` per budget.
            plan: every group's width with the energy rule's targets applied; updated in place.
        """
        by_name = {s.name: s for s in spectra}
        kinds = "+".join(k for k, _, _ in ceilings)
        what = " and ".join(f"{k}={b:.6g}" for k, _, b in ceilings)
        start = [fn(plan) for _, fn, _ in ceilings]
        if any(c > b for c, (_, _, b) in zip(start, ceilings, strict=True)):
            taken, cur = self._cut_to_budget(by_name, ceilings, plan, draft.floors)
            planned = ", ".join(f"{c:.6g}" for c in start)
            for name, k in taken.items():
                s = by_name[name]
                n_kept = s.energy_kept.numel()
                kept = float(s.energy_kept[min(plan[name], n_kept) - 1]) if n_kept else 1.0
                draft.reasons[name] += (
                    f"; budget {what} (planned {planned}): {k} more channel(s) removed, lowest "
                    f"energy lost per {kinds} saved -> {plan[name]} (energy kept {kept:.6f})"
                )
                draft.target[name] = plan[name]
            if any(c > b for c, (_, _, b) in zip(cur, ceilings, strict=True)):
                self._not_reached(spectra, draft, what, cur)
        waiting = None  # fill_budget: the strongest option that did not fit; the rest wait
        for _, name, w, msg in sorted(draft.grows):
            old = plan[name]
            if waiting is not None:
                draft.reasons[name] = f"{msg}; growth waits: {waiting} is needed more"
                continue
            plan[name] = w
            over = [(k, c, b) for k, fn, b in ceilings if (c := fn(plan)) > b]
            if not over:
                draft.target[name] = w
                continue
            plan[name] = old
            k, c, b = over[0]
            cap = by_name[name].cap
            took = (
                self._fill_one(name, old, w - old, ceilings, plan, cap) if self.fill_budget else 0
            )
            if took:
                draft.target[name] = old + took
                costs = self._costs_text(ceilings, plan)
                draft.reasons[name] = f"{msg}; +{took} of +{w - old} fit (fill_budget) -> {costs}"
                waiting = repr(name)  # it asked for more than fit
                continue
            draft.reasons[name] = f"{msg}; growth blocked: {k} would be {c:.6g} > budget {b:.6g}"
            if self.fill_budget:  # a cheaper, less needed group must not take its room
                waiting = repr(name)
        if waiting is not None:
            return
        for _, name, n, add in sorted(draft.fills):
            if plan[name] != n:  # cut to fit a ceiling this step
                continue
            took = self._fill_one(name, n, add, ceilings, plan, by_name[name].cap)
            if took:
                draft.target[name] = n + took
                costs = self._costs_text(ceilings, plan)
                draft.reasons[name] += (
                    f"; filling the budget (fill_budget): +{took} (of up to {add}, "
                    f"grow_fraction={self.grow_fraction:g}) -> {costs}"
                )
            if took < add:  # the budget is full for this group; the weaker ones wait
                break

    def _fit_uniform(self, spectra, draft: _Draft, ceilings, plan: dict[str, int], reference):
        """``allocation="uniform"``: while a cost exceeds its ceiling, remove one channel from
        the group whose width is the largest fraction of its reference (ties: the wider
        reference, then the name), never below its floor. With ``fill_budget`` and every cost
        within its ceiling, add one channel at a time to the group with the smallest fraction
        (ties: the narrower reference, then the name) while every cost stays within its ceiling,
        each group by at most ``ceil(n * grow_fraction)`` this step and never past its cap.
        ``plan`` updated in place."""
        names = [s.name for s in spectra]
        by_name = {s.name: s for s in spectra}
        ref = {n: max(int(reference.get(n, plan[n])), 1) for n in names}
        start = dict(plan)

        def fits() -> bool:
            return all(fn(plan) <= b for _, fn, b in ceilings)

        what = " and ".join(f"{k}={b:.6g}" for k, _, b in ceilings)
        while not fits():
            live = [n for n in names if self._below(plan[n]) >= max(draft.floors[n], 1)]
            if not live:
                self._not_reached(spectra, draft, what, [fn(plan) for _, fn, _ in ceilings])
                break
            n = max(live, key=lambda m: (plan[m] / ref[m], ref[m], m))
            plan[n] = self._below(plan[n])
        if self.fill_budget and self.grow_fraction > 0 and plan == start:
            most = {n: plan[n] + self._grown(plan[n], math.ceil(plan[n] * self.grow_fraction),
                                             by_name[n].cap)
                    for n in names}  # fmt: skip
            while True:
                room = [n for n in names if plan[n] < most[n]]
                if not room:
                    break
                n = min(room, key=lambda m: (plan[m] / ref[m], -ref[m], m))
                was = plan[n]
                plan[n] = min(most[n], self._up(was + 1))
                if not fits():
                    plan[n] = was
                    break
        for n in names:
            if plan[n] != start[n]:
                verb = "removed" if plan[n] < start[n] else "added (fill_budget)"
                draft.target[n] = plan[n]
                draft.reasons[n] += (
                    f"; budget {what}: {abs(start[n] - plan[n])} channel(s) {verb}, uniformly "
                    f"-> {plan[n]} ({plan[n] / ref[n]:.4f} of reference width {ref[n]})"
                )

    def _align_down(self, spectra, draft: _Draft) -> dict[str, int]:
        """``align``: every group no rule moved whose width is not a multiple of ``round_to``
        (above ``round_to``, below its cap) goes down to the multiple below, unless that is
        below its floor. Returns group name -> the aligned width, for :meth:`_align_up`."""
        q = self.round_to
        down = {}
        for s in spectra:
            n = s.width
            if draft.target[s.name] != n or n % q == 0 or n <= q or n >= s.cap:
                continue
            if n // q * q < draft.floors[s.name]:
                draft.reasons[s.name] += (
                    f"; not aligned to round_to={q} (floor {draft.floors[s.name]})"
                )
                continue
            down[s.name] = draft.target[s.name] = n // q * q
        return down

    def _align_up(self, spectra, draft: _Draft, ceilings, plan: dict[str, int], down) -> None:
        """``align``, after the budget: give the groups :meth:`_align_down` moved (and nothing
        moved since) the multiple above their width instead, the blocks that fit given back
        as after a cut (:meth:`_give_back`: most energy per unit of cost first); then say in
        each one's reason where it went."""
        by_name = {s.name: s for s in spectra}
        still = {n for n, w in down.items() if plan[n] == w}
        up = {n: min(by_name[n].cap, self._up(by_name[n].width)) for n in still}

        def fits(cur: list[float]) -> bool:
            return all(c <= b for c, (_, _, b) in zip(cur, ceilings, strict=True))

        self._give_back(by_name, ceilings, plan, {n: up[n] - plan[n] for n in still}, up, fits)
        for name in sorted(still):
            n, w = by_name[name].width, plan[name]
            draft.target[name] = w
            how = "up, within" if w > n else "up would exceed"
            costs = self._costs_text(ceilings, plan) if ceilings else "no budget"
            draft.reasons[name] += (
                f"; aligned to round_to={self.round_to}: {n} -> {w} ({how} the budget: {costs})"
            )

    @staticmethod
    def _not_reached(spectra, draft: _Draft, what: str, costs: list[float]) -> None:
        """Say in every group's reason that the floors kept the budget from being met."""
        reached = ", ".join(f"{c:.6g}" for c in costs)
        for s in spectra:
            draft.reasons[s.name] += (
                f"; budget {what} not reached this step ({reached} after the floors)"
            )

    @staticmethod
    def _costs_text(ceilings, plan: dict[str, int]) -> str:
        """Every cost of ``plan`` against its ceiling, for a decision's reason."""
        return ", ".join(f"{k} {fn(plan):.6g} <= {b:.6g}" for k, fn, b in ceilings)

    def _fill_one(
        self, name: str, n: int, add: int, ceilings, plan: dict[str, int], cap: int
    ) -> int:
        """The most channels, at most ``add``, that group ``name`` (``n`` wide) can take with
        every cost within its ceiling, for a width that is a multiple of ``round_to`` (or
        ``cap``); ``plan`` updated in place."""
        for k in range(add, 0, -1):
            if (n + k) % self.round_to and n + k != cap:
                continue
            plan[name] = n + k
            if all(fn(plan) <= b for _, fn, b in ceilings):
                return k
        plan[name] = n
        return 0

    def _cut_to_budget(self, by_name, ceilings, plan: dict[str, int], floors: dict[str, int]):
        """Remove single channels from ``plan`` (in place), cheapest first, until it fits
        every ceiling or every group is at its floor (``floors``, by name). Returns (channels
        taken per group, the costs reached)."""
        taken: dict[str, int] = {}

        def costs() -> list[float]:
            return [fn(plan) for _, fn, _ in ceilings]

        def score(name: str) -> float | None:  # relative energy lost per unit of cost saved
            w = plan[name]
            low = self._below(w)
            if low < max(floors[name], 1):
                return None
            cur = costs()
            plan[name] = low
            after = costs()
            plan[name] = w
            if len(ceilings) == 1:
                saved = cur[0] - after[0]  # in the cost's own unit, as before a second ceiling
            else:  # each ceiling still exceeded, relative to it
                saved = sum((c - a) / b for c, a, (_, _, b) in zip(cur, after, ceilings, strict=True)
                            if c > b)  # fmt: skip
            if saved <= 0:
                return None
            s = by_name[name]
            if s.total_energy <= 0 or low >= s.energy.numel():
                return 0.0 / saved
            return float(s.energy[low:w].sum()) / s.total_energy / saved

        def fits(cur: list[float]) -> bool:
            return all(c <= b for c, (_, _, b) in zip(cur, ceilings, strict=True))

        start = dict(plan)
        heap = [(sc, name) for name in by_name if (sc := score(name)) is not None]
        heapq.heapify(heap)
        cur = costs()
        while not fits(cur) and heap:
            _, name = heapq.heappop(heap)
            fresh = score(name)
            if fresh is None:
                continue
            if heap and fresh > heap[0][0] + 1e-18:
                heapq.heappush(heap, (fresh, name))
                continue
            low = self._below(plan[name])
            taken[name] = taken.get(name, 0) + plan[name] - low
            plan[name] = low
            cur = costs()
            nxt = score(name)
            if nxt is not None:
                heapq.heappush(heap, (nxt, name))
        if self.round_to > 1 and fits(cur):
            cur = self._give_back(by_name, ceilings, plan, taken, start, fits)
        return taken, cur

    def _give_back(self, by_name, ceilings, plan, taken, start, fits):
        """After a cut in blocks of ``round_to``: the last block may have saved far more than
        the ceiling needed, so give back, one block at a time and the most energy per unit of
        cost first, the blocks cut this step that fit (``align`` gives back its blocks, up to
        ``start``, the same way). ``plan`` and ``taken`` updated in place;
        returns the costs reached."""
        while True:
            cur = [fn(plan) for _, fn, _ in ceilings]
            best = None
            for name, k in taken.items():
                if k <= 0:
                    continue
                w = plan[name]
                up = min(start[name], self._up(w + 1))
                plan[name] = up
                after = [fn(plan) for _, fn, _ in ceilings]
                plan[name] = w
                if not fits(after):
                    continue
                added = sum(
                    (a - c) / b for c, a, (_, _, b) in zip(cur, after, ceilings, strict=True)
                )
                s = by_name[name]
                back = float(s.energy[w:up].sum()) / s.total_energy if s.total_energy > 0 else 0.0
                key = (back / added if added > 0 else math.inf, name)
                if best is None or key > best[0]:
                    best = (key, name, up)
            if best is None:
                return cur
            _, name, up = best
            taken[name] -= up - plan[name]
            plan[name] = up
            if not taken[name]:
                del taken[name]


@dataclass
class _Draft:
    """Decisions in the making.

    Attributes:
        target: group name -> planned width.
        reasons: group name -> why.
        grows: grow options ``(-share, group name, width, reason)``; the budget takes them
            strongest first.
        fills: with ``fill_budget``, the full groups below the grow threshold
            ``(-share, group name, width, channels it may add)``, taken after ``grows``.
        floors: group name -> the lowest width this step (:meth:`Policy.floor`, or a hold).
    """

    target: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    grows: list[tuple[float, str, int, str]] = field(default_factory=list)
    fills: list[tuple[float, str, int, int]] = field(default_factory=list)
    floors: dict[str, int] = field(default_factory=dict)


def budget_at(
    step: int, start_params: int, target: int | None, shrink_steps: int, shrink_start: int = 0
) -> int | None:
    """The parameter budget at ``step`` of a resizing schedule: ``start_params`` until
    ``shrink_start``, then geometric to ``target``, reached at ``shrink_start + shrink_steps``
    and kept after. It falls when the network starts above the target and rises when it
    starts below (a growing run, whose policy fills the budget as it rises).

    Args:
        step: the training step.
        start_params: the parameter count at step 0.
        target: the final budget (None: no budget).
        shrink_steps: steps over which the budget falls.
        shrink_start: the step at which it starts falling.

    Returns:
        the budget, or None when there is no target.
    """
    if target is None:
        return None
    step -= shrink_start
    if shrink_steps <= 0 or step >= shrink_steps or start_params == target or start_params <= 0:
        return int(target)
    frac = max(0, step) / shrink_steps
    return int(round(start_params * (target / start_params) ** frac))
