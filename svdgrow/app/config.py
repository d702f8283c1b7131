"""A run's settings (:class:`TrainConfig`, saved as ``config.json``) and its LR schedule."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from svdgrow import Policy

from .data import IMAGE_SHAPE, NUM_CLASSES
from .models import count_params, narrow_spec, preset_spec, validate_spec

__all__ = ["DEFAULT_LR", "DEFAULT_WD", "RECIPES", "TrainConfig", "check_spec_fits", "lr_at"]

logger = logging.getLogger(__name__)

DEFAULT_LR = {"sgd": 0.05, "adam": 2e-3, "adamw": 2e-3}
"""Peak learning rate per optimizer when ``lr`` is None."""
DEFAULT_WD = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.05}
"""Weight decay per optimizer when ``weight_decay`` is None."""

_SEARCH = {"start_scale": 4.0, "shrink_steps": 1000, "resize_every": 10, "energy_eps": 1e-4,
           "epochs": 15}  # fmt: skip
RECIPES: dict[str, dict[str, Any]] = {
    "mnist": {"preset": "mnist-2m", "target_params": 6000, **_SEARCH},
    "fashion-mnist": {
        "preset": "mnist-2m",
        "target_params": 60000,
        **_SEARCH,
        "start_scale": 8.0,
        "spectrum": "features",
    },
}
"""What ``svdgrow train --dataset D`` runs when no ``--preset``/``--spec`` is given: the large
preset narrowed uniformly to ``start_scale`` x the budget (4x on MNIST, 8x on Fashion-MNIST),
shrunk to ``target_params`` over ``shrink_steps`` (1,000); on Fashion-MNIST the policy reads
feature spectra (the settings measured best by benchmarks/frontier.py; docs/design.md, "Where
a run starts"). Fashion-MNIST starts from ``mnist-2m``, ``fashion-500k`` at twice the width:
narrowed to 8x a budget up to ~76k both give the same network, and above it only the wider
one holds an 8x start. Flags given on the command line override their part (``--mode
weights`` drops the feature spectrum, which needs the batch)."""


@dataclass
class TrainConfig:
    """Everything that defines a run (``svdgrow train --help`` explains each flag at length).

    Attributes:
        dataset: ``mnist`` or ``fashion-mnist``.
        preset: the starting architecture's name (see :data:`svdgrow.app.models.PRESETS`).
        spec: an explicit starting architecture spec (overrides ``preset``).
        bn: override the spec's BatchNorm flag (None keeps it).
        epochs: passes over the training set.
        batch_size: training batch size per process (the global batch is ``batch_size *
            world_size``; the last partial batch of an epoch is dropped).
        lr: peak learning rate (None: :data:`DEFAULT_LR` of the optimizer).
        optimizer: ``sgd`` (Nesterov momentum), ``adam`` or ``adamw``.
        momentum: SGD momentum.
        weight_decay: weight decay (None: :data:`DEFAULT_WD` of the optimizer).
        warmup_steps: linear LR warm-up steps before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        distill: weight of a distillation term in the loss once the budget starts to fall: the
            network as it was just before its first shrinking resize is kept as a frozen
            teacher, and the loss becomes ``(1 - distill) * CE + distill * T^2 * KL(teacher ||
            student)`` at temperature ``distill_temperature`` (0: off).
        distill_temperature: the distillation temperature T.
        resize_every: call the resizer every this many steps (0: never resize).
        resize_until: stop resizing after this fraction of all steps.
        resize_backoff: once the budget schedule is over, checks that change nothing space
            the next one out, doubling up to this many times ``resize_every`` steps (after
            ``hold_grown`` of them at the normal pace); a check that changes a width returns
            to every ``resize_every`` steps. 1: never back off.
        mode: where the fold's moments come from: ``data`` (the current batch) or ``weights``.
        spectrum: what the width policy reads: ``weights`` (each group's weight spectrum) or
            ``features`` (the spectrum of what its consumers read on it, measured on the current
            batch; needs ``mode='data'``). See ``svdgrow.Resizer``.
        hold_grown: resizes after a group grows during which it is not pruned below the width
            it grew to (``svdgrow.Resizer``'s ``hold_grown``; 0: no hold).
        target_params: the parameter budget to shrink to (None: energy policy only).
        target_mflops: a second budget, forward MFLOPs per sample, that falls on the same
            schedule as ``target_params`` (from the starting network's FLOPs) and caps the
            widths as well (None: parameters only).
        shrink_steps: steps over which the budget falls geometrically to ``target_params``.
        shrink_start: the step at which the budget starts falling (before it, the budget is
            the starting size and the energy epsilon ``shrink_energy_eps``).
        start_scale: start from the architecture narrowed uniformly to ``start_scale *
            target_params`` parameters (never widened; None: as it is).
        energy_eps: the energy policy's epsilon after the budget schedule (None: Policy's).
        shrink_energy_eps: the energy policy's epsilon while the budget schedule runs.
        renorm: after every resize, scale the rows of BatchNorm-followed convolutions whose
            shape changed back to their RMS norm from before the resize.
        policy: extra keyword arguments for ``svdgrow.Policy(...)``.
        round_to: every width a resize moves a group to is a multiple of this
            (``svdgrow.Policy``'s ``round_to``: convolutions run faster on aligned widths; 1:
            any width).
        round_after_shrink: with ``round_to > 1``, widths are free while the budget schedule
            runs and ``round_to`` starts at the first resize after it, which moves every group
            to a multiple (down or up, within the budget: ``Policy(align=True)``); the
            schedule's cuts then choose among all widths and the epochs after it train
            aligned widths.
        augment: random shifts of up to ``shift`` pixels on the training batches.
        shift: largest augmentation shift in pixels.
        data_dir: dataset root (None: search $SVDGROW_DATA, ./data, ../shared/data).
        download: allow torchvision to download missing files.
        subset: train on a fixed random subset of this many samples (None: all).
        test_subset: evaluate on a fixed random subset of this many samples (None: all).
        eval_batch_size: batch size for evaluation.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler).
        compile: train through ``torch.compile`` with this backend (None: eagerly).
        backend: the process group's backend with several processes (None: gloo for the CPU,
            nccl for CUDA).
        dist_timeout: seconds before a collective that a dead or hung process never joins fails
            the others (several processes).
        world_size: the number of processes the run trains on (set from the launch; the
            global batch is ``batch_size * world_size``).
        seed: seed of initialisation, batch order, augmentation and the resizer's draws.
        threads: torch CPU threads (None: torch's default).
        checkpoint_minutes: also checkpoint mid-epoch at this interval (0: epoch ends only).
        progress: show a tqdm progress bar.
        run_dir: the run folder (None: ``runs/<dataset>-<preset>-<time>``).
        baseline_of: the run this one is a fixed-architecture baseline of (informational).
    """

    dataset: str = "mnist"
    preset: str = "quick"
    spec: dict[str, Any] | None = None
    bn: bool | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_steps: int = 50
    label_smoothing: float = 0.0
    distill: float = 0.0
    distill_temperature: float = 4.0
    resize_every: int = 20
    resize_until: float = 0.6
    resize_backoff: int = 8
    mode: str = "data"
    spectrum: str = "weights"
    hold_grown: int = 0
    round_to: int = 1
    round_after_shrink: bool = False
    target_params: int | None = None
    target_mflops: float | None = None
    shrink_steps: int = 600
    shrink_start: int = 0
    start_scale: float | None = None
    energy_eps: float | None = None
    shrink_energy_eps: float = 0.0
    renorm: bool = True
    policy: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    shift: int = 2
    data_dir: str | None = None
    download: bool = True
    subset: int | None = None
    test_subset: int | None = None
    eval_batch_size: int = 1000
    device: str = "auto"
    amp: bool = False
    compile: str | None = None
    backend: str | None = None
    dist_timeout: float = 600.0
    world_size: int = 1
    seed: int = 0
    threads: int | None = None
    checkpoint_minutes: float = 5.0
    progress: bool = True
    run_dir: str | None = None
    baseline_of: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (unknown keys are ignored with a warning)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("ignoring unknown config keys: %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in names})

    def starting_spec(self) -> dict[str, Any]:
        """The architecture the run starts from."""
        if self.spec is not None:
            spec = json.loads(json.dumps(self.spec))
        else:
            spec = preset_spec(self.preset)
        if self.bn is not None:
            spec["bn"] = bool(self.bn)
        if self.start_scale is not None and self.target_params is not None:
            spec, _ = narrow_spec(spec, round(self.start_scale * self.target_params))
        return spec

    def start_shortfall(self, spec: dict[str, Any]) -> str | None:
        """Why the starting ``spec`` is narrower than ``start_scale`` asks (the architecture is
        never widened), as a message naming what to give instead; None when it is not."""
        if self.start_scale is None or self.target_params is None or self.start_scale <= 1:
            return None
        want, have = round(self.start_scale * self.target_params), count_params(spec)
        if have >= 0.95 * want:
            return None
        arch = f"--preset {self.preset}" if self.spec is None else "the --spec architecture"
        wider = (" (--preset mnist-2m is fashion-500k at twice the width)"
                 if self.spec is None and self.preset == "fashion-500k" else "")  # fmt: skip
        return (
            f"--start-scale {self.start_scale:g} asks for a start of {want:,} parameters, but "
            f"{arch} has {have:,}: the run starts from it as it is "
            f"({have / self.target_params:.1f}x the budget); for a wider start give a wider "
            f"architecture{wider}"
        )

    def resolved_lr(self) -> float:
        """The peak learning rate (``lr``, or the optimizer's default)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def resolved_wd(self) -> float:
        """The weight decay (``weight_decay``, or the optimizer's default)."""
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WD[self.optimizer]

    def make_policy(self) -> Policy:
        """The resizer's :class:`svdgrow.Policy`: ``policy`` plus ``energy_eps`` when set.

        Raises:
            ValueError: naming the ``--policy`` setting that Policy does not accept.
        """
        if not isinstance(self.policy, dict):
            kind = type(self.policy).__name__
            raise ValueError(
                f"--policy must be a JSON object such as '{{\"min_width\": 4}}', got a {kind}"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(Policy)}
        unknown = sorted(set(self.policy) - set(defaults))
        if unknown:
            raise ValueError(
                f"--policy: Policy has no setting {', '.join(map(repr, unknown))}; "
                f"its settings are {', '.join(defaults)}"
            )
        kwargs = dict(self.policy)
        if self.energy_eps is not None:
            kwargs.setdefault("energy_eps", self.energy_eps)
        if self.round_to != 1:
            if kwargs.get("round_to", self.round_to) != self.round_to:
                raise ValueError(
                    f"--round-to {self.round_to} and --policy round_to={kwargs['round_to']} "
                    "disagree: give one of them"
                )
            kwargs["round_to"] = self.round_to
        for key, value in kwargs.items():
            numeric = isinstance(defaults[key], (int, float)) and not isinstance(
                defaults[key], bool
            )
            if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"--policy: {key} must be a number, got {value!r}")
        try:
            return Policy(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--policy: {exc}") from None

    def validate(self) -> None:
        """Check every setting before anything starts.

        Raises:
            ValueError: naming the first bad setting (as its command-line flag), what it must
                be and what it is.
        """
        for name, ok, must in _CHECKS:
            value = getattr(self, name)
            try:
                good = ok(value)
            except TypeError:  # e.g. a string where a number belongs, from a hand-edited file
                good = False
            if not good:
                raise ValueError(f"--{name.replace('_', '-')} must be {must}, got {value!r}")
        if self.spectrum == "features" and self.mode != "data":
            raise ValueError("--spectrum features is measured on the current batch: it needs "
                             "--mode data")  # fmt: skip
        if self.distill > 0 and self.target_params is None:
            raise ValueError("--distill takes its teacher when the budget starts to fall: give "
                             "--target-params too")  # fmt: skip
        if self.target_mflops is not None and self.target_params is None:
            raise ValueError("--target-mflops is a second budget beside the parameter budget: "
                             "give --target-params too")  # fmt: skip
        if self.round_after_shrink and (self.round_to == 1 or self.target_params is None):
            raise ValueError("--round-after-shrink rounds widths when the budget schedule ends: "
                             "give --round-to N (N > 1) and --target-params")  # fmt: skip
        if self.start_scale is not None and self.target_params is None:
            raise ValueError("--start-scale is a multiple of --target-params: give both")
        if self.target_params is not None and self.resize_every == 0:
            raise ValueError("--target-params needs resizing: give --resize-every N with N >= 1")
        try:
            spec = self.starting_spec()
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        check_spec_fits(spec, self.dataset)
        if self.resize_every > 0:
            self.make_policy()


def check_spec_fits(spec: dict[str, Any], dataset: str) -> None:
    """Check that ``spec`` is a buildable network whose input and output fit ``dataset``.

    Raises:
        ValueError: naming the spec entry that is malformed or does not fit.
    """
    validate_spec(spec)
    channels, size, _ = IMAGE_SHAPE
    fits = {"in_channels": channels, "input_size": size, "num_classes": NUM_CLASSES}
    for key, want in fits.items():
        if spec[key] != want:
            raise ValueError(
                f"the architecture spec has {key} {spec[key]}, but {dataset} has {channels}-"
                f"channel {size}x{size} images in {NUM_CLASSES} classes: set {key} to {want}"
            )


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("optimizer", lambda v: v in DEFAULT_LR, "sgd, adam or adamw"),
    ("mode", lambda v: v in ("weights", "data"), "weights or data"),
    ("spectrum", lambda v: v in ("weights", "features"), "weights or features"),
    ("hold_grown", lambda v: _count(v) and v >= 0, "an integer >= 0 (resizes)"),
    ("round_to", lambda v: _count(v) and v >= 1, "an integer >= 1 (1: any width)"),
    ("round_after_shrink", lambda v: isinstance(v, bool), "true or false"),
    ("epochs", lambda v: _count(v) and v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: _count(v) and v >= 1, "an integer >= 1"),
    ("eval_batch_size", lambda v: _count(v) and v >= 1, "an integer >= 1"),
    ("lr", lambda v: v is None or (_finite(v) and v > 0), "a finite number > 0"),
    ("momentum", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("weight_decay", lambda v: v is None or (_finite(v) and v >= 0), "a finite number >= 0"),
    ("warmup_steps", lambda v: _count(v) and v >= 0, "an integer >= 0"),
    ("label_smoothing", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("distill", lambda v: _finite(v) and 0 <= v <= 1, "a weight in [0, 1] (0: off)"),
    ("distill_temperature", lambda v: _finite(v) and v > 0, "a temperature > 0"),
    ("resize_every", lambda v: _count(v) and v >= 0, "an integer >= 0 (0: never resize)"),
    ("resize_until", lambda v: _finite(v) and 0 <= v <= 1, "a fraction of all steps in [0, 1]"),
    ("resize_backoff", lambda v: _count(v) and v >= 1, "an integer >= 1 (1: never back off)"),
    ("target_params", lambda v: v is None or (_count(v) and v >= 1), "a count >= 1"),
    ("target_mflops", lambda v: v is None or (_finite(v) and v > 0), "a number of MFLOPs > 0"),
    ("shrink_steps", lambda v: _count(v) and v >= 0, "an integer >= 0"),
    ("shrink_start", lambda v: _count(v) and v >= 0, "an integer >= 0 (a step)"),
    ("start_scale", lambda v: v is None or (_finite(v) and v > 0), "a number > 0"),
    ("shrink_energy_eps", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("shift", lambda v: _count(v) and v >= 0, "an integer >= 0 (pixels)"),
    ("subset", lambda v: v is None or (_count(v) and v >= 1), "a sample count >= 1"),
    ("test_subset", lambda v: v is None or (_count(v) and v >= 1), "a sample count >= 1"),
    ("threads", lambda v: v is None or (_count(v) and v >= 1), "an integer >= 1"),
    ("checkpoint_minutes", lambda v: _finite(v) and v >= 0, "a number >= 0 (0: epoch ends)"),
    ("compile", lambda v: v is None or (isinstance(v, str) and v != ""), "a torch.compile backend"),
    ("backend", lambda v: v in (None, "gloo", "nccl"), "gloo or nccl"),
    ("dist_timeout", lambda v: _finite(v) and v > 0, "a number of seconds > 0"),
    ("world_size", lambda v: _count(v) and v >= 1, "a process count >= 1"),
]
"""``(field, test, what it must be)`` for every setting :meth:`TrainConfig.validate` checks."""


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return 0.5 * peak * (1.0 + math.cos(math.pi * t))
