"""Stage 1: find coupling groups, every tensor dimension that must change together with one width.

``trace(model, example_input)`` traces the model with torch.fx, runs it once on
``example_input`` to learn every value's shape, follows the channel layout of each value
through the graph, and returns a :class:`CouplingGraph`: the groups (producers, norms,
consumers, width, and why a group is frozen) and each consumer's input layout. An op the
tracer cannot follow freezes the groups it touches, with a :class:`CouplingWarning` (or a
``ValueError`` when ``strict=True``). :mod:`svdgrow.trace.optable` lists what is followed and
what is frozen; ``docs/design.md`` (section "Stage 1: trace") explains why.

Use a batch of at least 2 in ``example_input``: with a batch of 1 some batch reshapes cannot
be told apart from channel reshapes.

Example::

    graph = trace(model, torch.randn(2, 1, 28, 28))
    print(graph.describe(model))
    for group in graph.resizable():
        ...  # group.producers, group.norms, graph.consumers_of(group.id)
"""

from .graph import ChannelwiseLayout, ConsumerLayout, CouplingGraph, CouplingWarning, Group
from .tracer import trace

__all__ = [
    "ChannelwiseLayout",
    "ConsumerLayout",
    "CouplingGraph",
    "CouplingWarning",
    "Group",
    "trace",
]
