"""Width policy: stage 3 of the data flow in DESIGN.md (spectra -> width per group).

Per group (``n`` channels, energies ``e_i = sigma_i**2``):

* **prune** to the smallest ``r`` whose cumulative energy reaches ``1 - energy_eps``, never below
  ``min_width`` (and 1), and by at most ``max_prune_fraction`` of ``n`` per step (at least one
  channel may always go); several channels move at once.
* **grow** when every direction is needed and even the smallest carries a large share,
  ``sigma_min**2 / mean(sigma**2) >= grow_threshold``: by ``ceil(n * grow_fraction)``, capped by
  the input dimension (``min`` over producers of ``in*kh*kw``).
* **budget** (optional, ``"params"`` or ``"flops"``): when the planned widths cost more, further
  single-channel removals are taken network-wide, cheapest first by *relative energy lost per
  unit of cost saved*; growth is allowed only while it fits.

Every decision carries a reason with its numbers.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable

from .spectrum import GroupSpectrum

__all__ = ["Policy", "Decision"]


@dataclass
class Decision:
    """What the policy decided for one group.

    Attributes:
        group: group name. old_width, new_width: channels before and after.
        action: ``'prune'``, ``'grow'`` or ``'keep'``. reason: why, with the numbers.
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
    """

    energy_eps: float = 1e-2
    min_width: int = 2
    grow_threshold: float = 0.5
    grow_fraction: float = 0.25
    max_prune_fraction: float = 0.5
    budget: float | None = None
    budget_kind: str = "params"

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

    # ------------------------------------------------------------------------------------------
    def floor(self, n: int) -> int:
        """Lowest width a group of ``n`` channels may reach this step."""
        step = max(1, math.floor(n * self.max_prune_fraction)) if self.max_prune_fraction > 0 else 0
        return min(n, max(int(self.min_width), 1, n - step))

    def decide(
        self,
        spectra: list[GroupSpectrum],
        cost: Callable[[dict[str, int]], float] | None = None,
        widths: dict[str, int] | None = None,
        budget: float | None = None,
    ) -> list[Decision]:
        """Decide a width for every analysed group.

        Args:
            spectra: from :meth:`Resizer.analyse`.
            cost: ``cost(widths by group name) -> float`` of the whole network (needed with a
                budget). widths: current widths of all groups (for ``cost``).
            budget: overrides ``self.budget`` for this step.

        Returns:
            one :class:`Decision` per spectrum, in order.
        """
        budget = self.budget if budget is None else budget
        eps = self.energy_eps
        target: dict[str, int] = {}
        reasons: dict[str, str] = {}
        grow_opts: list[tuple[float, str, int, str]] = []
        for s in spectra:
            n = s.width
            lo = self.floor(n)
            r_e = s.rank_for(eps)
            if r_e < n:
                kept = float(s.energy_kept[r_e - 1]) if s.energy_kept.numel() else 1.0
                r = max(r_e, lo)
                msg = f"energy kept at rank {r_e}: {kept:.6f} >= {1 - eps:.6f} (eps={eps:g})"
                if r > r_e:
                    why = f"min_width={self.min_width}" if r == max(int(self.min_width), 1) else f"max_prune_fraction={self.max_prune_fraction:g}"
                    kept_r = float(s.energy_kept[min(r, s.energy_kept.numel()) - 1])
                    msg += f"; limited to {r} by {why} (energy kept {kept_r:.6f})"
                target[s.name] = r
                reasons[s.name] = msg
                continue
            sv = s.singular_values[:n]
            share = float(sv[-1] ** 2 / (sv.pow(2).mean())) if s.total_energy > 0 else 0.0
            target[s.name] = n
            if share >= self.grow_threshold and n < s.cap and self.grow_fraction > 0:
                add = min(math.ceil(n * self.grow_fraction), s.cap - n)
                msg = (
                    f"all {n} directions needed (energy at rank {n - 1}: "
                    f"{float(s.energy_kept[n - 2]) if n > 1 else 0.0:.6f} < {1 - eps:.6f}); "
                    f"sigma_min^2/mean(sigma^2)={share:.4f} >= grow_threshold={self.grow_threshold:g}; "
                    f"+{add} (grow_fraction={self.grow_fraction:g}, cap {s.cap})"
                )
                grow_opts.append((-share, s.name, n + add, msg))
                reasons[s.name] = msg
            else:
                why = f"at cap {s.cap}" if n >= s.cap else f"sigma_min^2/mean(sigma^2)={share:.4f} < grow_threshold={self.grow_threshold:g}"
                reasons[s.name] = f"all {n} directions needed (eps={eps:g}); {why}"
        if budget is None:
            for _, name, w, _ in grow_opts:
                target[name] = w
        else:
            if cost is None or widths is None:
                raise ValueError("a budget needs a cost function and the current widths")
            self._fit_budget(spectra, target, reasons, grow_opts, cost, dict(widths), float(budget))
        out = []
        for s in spectra:
            w = target[s.name]
            action = "prune" if w < s.width else "grow" if w > s.width else "keep"
            out.append(Decision(s.name, s.width, w, action, reasons[s.name]))
        return out

    # ------------------------------------------------------------------------------------------
    def _fit_budget(self, spectra, target, reasons, grow_opts, cost, widths, budget):
        by_name = {s.name: s for s in spectra}
        plan = dict(widths)
        plan.update(target)
        kind = self.budget_kind
        start_cost = cost(plan)
        taken: dict[str, int] = {}

        def lost(name: str, w: int) -> float:  # relative energy of the w-th direction
            s = by_name[name]
            if s.total_energy <= 0 or w > s.energy.numel():
                return 0.0
            return float(s.energy[w - 1]) / s.total_energy

        def score(name: str) -> float | None:
            w = plan[name]
            if w <= self.floor(by_name[name].width):
                return None
            cur = cost(plan)
            plan[name] = w - 1
            saved = cur - cost(plan)
            plan[name] = w
            if saved <= 0:
                return None
            return lost(name, w) / saved

        heap = []
        if start_cost > budget:
            for name in by_name:
                sc = score(name)
                if sc is not None:
                    heap.append((sc, name))
            heapq.heapify(heap)
            cur = start_cost
            while cur > budget and heap:
                sc, name = heapq.heappop(heap)
                fresh = score(name)
                if fresh is None:
                    continue
                if heap and fresh > heap[0][0] + 1e-18:
                    heapq.heappush(heap, (fresh, name))
                    continue
                plan[name] -= 1
                taken[name] = taken.get(name, 0) + 1
                cur = cost(plan)
                nxt = score(name)
                if nxt is not None:
                    heapq.heappush(heap, (nxt, name))
            for name, k in taken.items():
                s = by_name[name]
                kept = float(s.energy_kept[min(plan[name], s.energy_kept.numel()) - 1]) if s.energy_kept.numel() else 1.0
                reasons[name] += (
                    f"; budget {kind}={budget:.6g} (planned {start_cost:.6g}): {k} more channel(s) "
                    f"removed, lowest energy lost per {kind} saved -> {plan[name]} (energy kept {kept:.6f})"
                )
                target[name] = plan[name]
            if cur > budget:
                for s in spectra:
                    reasons[s.name] += f"; budget {kind}={budget:.6g} not reached this step ({cur:.6g} after the floors)"
        for _, name, w, msg in sorted(grow_opts):
            old = plan[name]
            plan[name] = w
            c = cost(plan)
            if c <= budget:
                target[name] = w
            else:
                plan[name] = old
                reasons[name] = f"{msg}; growth blocked: {kind} would be {c:.6g} > budget {budget:.6g}"
