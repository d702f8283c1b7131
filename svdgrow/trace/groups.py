"""Raw coupling groups while the graph is walked: union-find, freezing, and per-value layouts.

Raw group ids are handed out in graph order and merged by :meth:`GroupSet.union`; a merged
group is represented by its smallest id (its root). ``docs/design.md`` (section "Stage 1:
trace") explains groups, layouts and freezing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["GroupSet", "Layout", "Opaque", "RawGroup"]


@dataclass(frozen=True)
class Layout:
    """Channel layout of one value: segments (raw group ids) of ``block`` entries each, along
    dim ``dim`` (1, or the last dim of a channels-last value after a permute)."""

    segs: tuple[int, ...]
    block: int = 1
    producer: str | None = None  # the producer whose output this value is, directly
    sources: tuple[str | None, ...] = ()  # after a cat: per segment, what ``producer`` says
    dim: int = 1

    def direct_sources(self) -> tuple[str | None, ...]:
        """Per segment, the producer whose output it is directly (None where none is)."""
        if self.sources:
            return self.sources
        return (self.producer,) if len(self.segs) == 1 else (None,) * len(self.segs)


@dataclass(frozen=True)
class Opaque:
    """A value derived from channels through an op the tracer does not follow."""

    origin: str


@dataclass
class RawGroup:
    """One raw group: what the walk has learned about a channel space so far.

    Members are ``(node index, module name)`` pairs so that the final :class:`Group` lists
    them in graph order. Only a root's record is current: :meth:`GroupSet.union` moves
    everything into the root.

    Attributes:
        name: the name the group gets when it has no producer ("input", "opaque:<node>"...).
        width: its width when traced, None when unknown.
        producers: Conv2d/Linear modules whose output is this group.
        norms: BatchNorm modules applied to this group.
        norm_after: for each norm, the producer it reads directly, or None.
        consumers: Conv2d/Linear modules that read this group.
        channelwise: modules and tensors whose per-channel entries follow this group without
            mixing channels (depthwise convolutions, gate producers, norms over
            concatenations, per-channel parameters).
        frozen: the reasons the group may not be resized (empty when it may).
        deferred_freezes: reasons to freeze it only if nothing else has by the end of the walk
            (softmax over channels: it matters only when the group is not frozen anyway).
    """

    name: str
    width: int | None
    producers: list[tuple[int, str]] = field(default_factory=list)
    norms: list[tuple[int, str]] = field(default_factory=list)
    norm_after: dict[str, str | None] = field(default_factory=dict)
    consumers: list[tuple[int, str]] = field(default_factory=list)
    channelwise: list[tuple[int, str]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    deferred_freezes: list[str] = field(default_factory=list)


class GroupSet:
    """Union-find over raw groups, with the freeze reasons and the warning lines.

    Args:
        strict: raise a ``ValueError`` instead of recording a warning when an op freezes a
            group that was not frozen yet.

    Attributes:
        raw: every raw group by id (only roots are current).
        messages: one line per op that froze groups which were not frozen yet.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.parent: list[int] = []
        self.raw: list[RawGroup] = []
        self.messages: list[str] = []

    def new_group(self, name: str, width: int | None, frozen: str | None = None) -> int:
        """A new raw group (frozen for ``frozen`` when given); returns its id."""
        gid = len(self.raw)
        self.parent.append(gid)
        self.raw.append(RawGroup(name=name, width=width))
        if frozen:
            self.raw[gid].frozen.append(frozen)
        return gid

    def find(self, g: int) -> int:
        """The root of group ``g`` (with path compression)."""
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def union(self, a: int, b: int) -> int:
        """Merge the groups of ``a`` and ``b`` into the smaller root; returns that root."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra
        ga, gb = self.raw[ra], self.raw[rb]
        if ga.width is None:
            ga.width = gb.width
        ga.producers += gb.producers
        ga.norms += gb.norms
        for k, v in gb.norm_after.items():
            ga.norm_after.setdefault(k, v)
        ga.consumers += gb.consumers
        ga.channelwise += gb.channelwise
        ga.frozen += gb.frozen
        ga.deferred_freezes += gb.deferred_freezes
        self.parent[rb] = ra
        return ra

    def record(self, g: int) -> RawGroup:
        """The current record of the group ``g`` belongs to."""
        return self.raw[self.find(g)]

    def display_name(self, g: int) -> str:
        """The group's name in messages: its first producer (by graph order) or its own name."""
        r = self.record(g)
        return min(r.producers)[1] if r.producers else r.name

    def width(self, g: int) -> int | None:
        """The traced width of the group ``g`` belongs to."""
        return self.record(g).width

    def freeze(self, groups: Iterable[int], reason: str, warn: bool = True) -> None:
        """Mark ``groups`` frozen for ``reason``.

        Records a warning line (or raises when ``strict``) if ``warn`` and at least one of
        them was not frozen yet; an op that only touches frozen groups changes nothing.

        Raises:
            ValueError: ``strict`` and a group that was resizable gets frozen.
        """
        roots = sorted({self.find(g) for g in groups})
        if not roots:
            return
        if warn and any(not self.raw[r].frozen for r in roots):
            names = ", ".join(self.display_name(r) for r in roots)
            msg = f"{reason}; frozen group(s): {names}"
            if self.strict:
                raise ValueError(
                    f"svdgrow.trace(strict=True): {msg}. Rewrite that part of the model with "
                    "supported ops, or call trace(..., strict=False) to freeze those groups "
                    "instead of failing."
                )
            if msg not in self.messages:
                self.messages.append(msg)
        for r in roots:
            if reason not in self.raw[r].frozen:
                self.raw[r].frozen.append(reason)

    def defer_freeze(self, g: int, reason: str) -> None:
        """Freeze the group of ``g`` for ``reason`` at the end, unless it is frozen by then."""
        r = self.record(g)
        if reason not in r.deferred_freezes:
            r.deferred_freezes.append(reason)

    def apply_deferred_freezes(self) -> None:
        """Freeze (with a warning) every root still resizable that has a deferred reason."""
        for gid, r in enumerate(self.raw):
            if self.find(gid) == gid and r.deferred_freezes and not r.frozen:
                for reason in r.deferred_freezes:
                    self.freeze([gid], reason)

    def all_roots(self) -> list[int]:
        """Every root, in id order."""
        return sorted({self.find(g) for g in range(len(self.raw))})
