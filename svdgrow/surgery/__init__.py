"""Stage 4, width surgery: prune with a fold, grow with orthogonal rows, commit all-or-nothing.

``prune`` plans which channels stay and what is folded (on moments from ``moments``, zero
padding handled in ``patches``, pivots from ``pivots``); ``plan`` turns the group changes into
tensor moves (stage 5, the optimizer state, included); ``commit`` applies them in one
``slice_copy`` call through a rollback journal; ``renorm`` rescales BatchNorm-followed rows
afterwards. The model as they read it, and what can be resized, is in ``context``. See
docs/design.md, "Stage 4: surgery".
"""

from .check import (
    consumer_inputs,
    network_change,
    output_change,
    prefer_measured,
    pruned_columns,
)
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
    ConsumerMoments,
    Moments,
    capture_features,
    consumer_offsets,
    detect_activation,
    predict_features,
)
from .patches import (
    consumer_input_sizes,
    fits_on_patches,
    gather_patches,
    live_taps,
    patch_fold,
    tap_fractions,
    zero_padding,
)
from .pivots import (
    complement,
    grow_rows,
    pivoted_cholesky,
    pivoted_cholesky_batched,
    solve_spd,
)
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
    "ConsumerMoments",
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
    "consumer_input_sizes",
    "consumer_inputs",
    "consumer_offsets",
    "data_pivot_gram",
    "detect_activation",
    "fits_on_patches",
    "gather_patches",
    "grow_rows",
    "layer_facts",
    "network_change",
    "live_taps",
    "normed_producers",
    "output_change",
    "patch_fold",
    "pivoted_cholesky",
    "pivoted_cholesky_batched",
    "plan_prune_data",
    "plan_prune_magnitude",
    "plan_prunes",
    "prefer_measured",
    "pruned_columns",
    "predict_features",
    "renormalize_rows_",
    "row_norm_snapshot",
    "solve_spd",
    "tap_fractions",
    "weight_block",
    "zero_padding",
]
