"""Stage 4, width surgery: prune with a fold, grow with orthogonal rows, commit all-or-nothing.

``prune`` plans which channels stay and what is folded (on moments from ``moments``, pivots
from ``pivots``); ``plan`` turns the group changes into tensor moves (stage 5, the optimizer
state, included); ``commit`` applies them in one ``slice_copy`` call through a rollback
journal; ``renorm`` rescales BatchNorm-followed rows afterwards. See docs/design.md,
"Stage 4: surgery".
"""

from .commit import Journal, check_finite, commit_plan
from .context import (
    LAYERS,
    NORMS,
    LayerFacts,
    ResizeContext,
    check_resizable,
    check_targets,
    layer_facts,
    weight_block,
)
from .moments import (
    ACTIVATIONS,
    Moments,
    capture_features,
    consumer_offsets,
    detect_activation,
    predict_features,
)
from .pivots import complement, grow_rows, pivoted_cholesky, pivoted_cholesky_batched
from .plan import ResizePlan, TensorMove, build_plan
from .prune import (
    MODES,
    GroupChange,
    data_pivot_gram,
    plan_prune_data,
    plan_prune_magnitude,
    plan_prunes,
)
from .renorm import normed_producers, renormalize_rows_, row_norm_snapshot

__all__ = [
    "ACTIVATIONS",
    "LAYERS",
    "MODES",
    "NORMS",
    "GroupChange",
    "Journal",
    "LayerFacts",
    "Moments",
    "ResizeContext",
    "ResizePlan",
    "TensorMove",
    "build_plan",
    "capture_features",
    "check_finite",
    "check_resizable",
    "check_targets",
    "commit_plan",
    "complement",
    "consumer_offsets",
    "data_pivot_gram",
    "detect_activation",
    "grow_rows",
    "layer_facts",
    "normed_producers",
    "pivoted_cholesky",
    "pivoted_cholesky_batched",
    "plan_prune_data",
    "plan_prune_magnitude",
    "plan_prunes",
    "predict_features",
    "renormalize_rows_",
    "row_norm_snapshot",
    "weight_block",
]
