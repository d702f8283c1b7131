"""Find coupling groups: every tensor dimension that must change together with one width.

Stage 1 of the data flow in DESIGN.md. ``trace(model, example_input)`` runs torch.fx on the
model, propagates channel layouts through its graph, and returns a :class:`CouplingGraph`.

(Skeleton: data structures are fixed here; the tracer is being written.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Group", "ConsumerLayout", "CouplingGraph", "trace"]


@dataclass
class Group:
    """One channel space whose width changes as a unit.

    Attributes:
        id: index in ``CouplingGraph.groups``.
        name: stable, human-readable name (the first producer's module name, or "input").
        producers: names of Conv2d/Linear modules whose output channels (weight dim 0, bias)
            are this group's channels. Several when residual adds merge spaces.
        norms: names of BatchNorm1d/2d modules whose per-channel parameters and buffers
            follow this group.
        norm_after: for each norm, the producer it directly follows (its input is that
            producer's output), or None when it sits after an add / elsewhere.
        consumers: names of Conv2d/Linear modules that read this group in their input.
        frozen: None when the group may be resized, else the reason it may not (model input,
            model output, an op the tracer cannot follow, ...).
    """

    id: int
    name: str
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    norm_after: dict[str, str | None] = field(default_factory=dict)
    consumers: list[str] = field(default_factory=list)
    frozen: str | None = None


@dataclass
class ConsumerLayout:
    """How a consumer's input channels are laid out.

    A consumer's weight is viewed as ``[out, C, B]``: for Conv2d ``C = in_channels`` and
    ``B = kh*kw``; for a Linear after Flatten ``C`` channels of ``B = h*w`` columns each; for
    a plain Linear ``B = 1``. The C channels are the concatenation of ``segments`` (group ids,
    in order; more than one after torch.cat), each as wide as that group currently is.
    """

    module: str
    segments: list[int]
    block: int


@dataclass
class CouplingGraph:
    groups: list[Group]
    consumers: dict[str, ConsumerLayout]
    warnings: list[str] = field(default_factory=list)

    def resizable(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is None]


def trace(model, example_input, strict: bool = False) -> CouplingGraph:  # pragma: no cover
    raise NotImplementedError("the tracer is being written")
