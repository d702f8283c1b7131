"""The main job: train a light ResNet on (Fashion-)MNIST while the resizer changes its widths.

One run lives in one folder (``run_dir``):

- ``config.json``: the :class:`TrainConfig` of the run (and the starting spec);
- ``log.jsonl``: one JSON line per event: ``start``, every ``resize`` that changed a width,
  every ``epoch`` (step, epoch, widths of every layer and coupling group, params, FLOPs per
  sample, train/test accuracy and loss, LR, elapsed seconds), ``resume``, ``end``;
- ``checkpoints/last.pt``: the latest checkpoint (spec + tensors, see :mod:`svdgrow.checkpoint`),
  written at every epoch end, every ``checkpoint_minutes`` and on Ctrl-C;
- ``final_spec.json``: the architecture at the end; ``*.png``: plots (:mod:`svdgrow.plot`).

Shrinking schedule: a freshly initialised network has a flat spectrum, so energy alone would
keep nearly every channel at the start, when a step of the large network costs the most. With
``target_params`` set, a global parameter budget falls geometrically from the starting count to
``target_params`` over the first ``shrink_steps`` steps and is handed to ``Resizer.step``
(which prunes toward it, ranking groups network-wide); after that the budget stays at
``target_params`` as a cap while the energy policy prunes and grows below it. Resizing stops
after ``resize_until`` (a fraction of all steps) so the final network trains undisturbed
under the cosine LR schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_mod
from .data import DeviceDataset, load_dataset
from .models import build_model, conv_bn_pairs, count_flops, count_params, layer_widths, preset_spec, spec_of

__all__ = [
    "TrainConfig",
    "TrainingInterrupted",
    "train",
    "evaluate",
    "budget_at",
    "lr_at",
    "read_log",
    "last_checkpoint",
    "baseline_config",
    "row_norm_snapshot",
    "renormalize_bn_convs_",
]

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"
CKPT_NAME = os.path.join("checkpoints", "last.pt")

DEFAULT_LR = {"sgd": 0.05, "adam": 2e-3, "adamw": 2e-3}
DEFAULT_WD = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.05}


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as ``config.json``).

    Attributes:
        dataset: ``mnist`` or ``fashion-mnist``.
        preset: name of the starting architecture (see :data:`svdgrow.models.PRESETS`).
        spec: an explicit starting architecture spec (overrides ``preset``).
        bn: override the spec's BatchNorm flag (None keeps it).
        epochs: passes over the training set.
        batch_size: training batch size (the last partial batch of an epoch is dropped).
        lr: peak learning rate (None: 0.05 for SGD, 2e-3 for Adam/AdamW).
        optimizer: ``sgd`` (momentum, Nesterov), ``adam`` or ``adamw``.
        momentum: SGD momentum.
        weight_decay: None: 5e-4 for SGD, 0 for Adam, 0.05 for AdamW.
        warmup_steps: linear LR warm-up steps before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        resize_every: call the resizer every this many steps (0: never resize).
        resize_until: stop resizing after this fraction of all steps.
        mode: ``data`` (the fold fitted on the current training batch; default) or ``weights``
            (fitted on moments predicted from the weights; no extra forward pass).
        target_params: the parameter budget to shrink to (None: energy policy only).
        shrink_steps: steps over which the budget falls geometrically to ``target_params``.
        energy_eps: the energy policy's epsilon (keep 1 - eps of every group's energy) once
            the budget schedule is over (or throughout without ``target_params``); None keeps
            the Policy default.
        shrink_energy_eps: the epsilon while the budget schedule runs. 0 (the default) lets
            the budget alone decide how far to prune, ranking every channel network-wide;
            a larger value adds energy pruning on top, which can cut far below the budget
            (the spectrum of a freshly trained net is concentrated).
        renorm: after every resize, scale the rows of BatchNorm-followed convolutions whose
            shape changed back to their RMS norm from before the resize (see
            :func:`renormalize_bn_convs_`).
        policy: extra keyword arguments for ``Policy(...)``.
        augment: random shifts of up to ``shift`` pixels on the training batches.
        shift: largest augmentation shift in pixels.
        data_dir: dataset root (None: search $SVDGROW_DATA, ./data, ../shared/data).
        download: allow torchvision to download missing files.
        subset: train on a fixed random subset of this many samples.
        test_subset: evaluate on a fixed random subset of this many test samples.
        eval_batch_size: batch size for evaluation.
        device: ``cpu``, ``cuda`` or ``auto``.
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with GradScaler).
        seed: random seed of initialisation, batch order, augmentation.
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
    resize_every: int = 20
    resize_until: float = 0.6
    mode: str = "data"
    target_params: int | None = None
    shrink_steps: int = 600
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
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (unknown keys are ignored with a warning)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("ignoring unknown config keys: %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in names})

    def starting_spec(self) -> dict[str, Any]:
        """The architecture the run starts from."""
        spec = json.loads(json.dumps(self.spec)) if self.spec is not None else preset_spec(self.preset)
        if self.bn is not None:
            spec["bn"] = bool(self.bn)
        return spec

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def resolved_wd(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WD[self.optimizer]

    def validate(self) -> None:
        """Raise ValueError with an actionable message on inconsistent settings."""
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"optimizer {self.optimizer!r} unknown; choose sgd, adam or adamw")
        if self.mode not in ("weights", "data"):
            raise ValueError(f"mode {self.mode!r} unknown; choose weights or data")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.target_params is not None and self.resize_every <= 0:
            raise ValueError("--target-params needs resizing: give --resize-every N with N >= 1")
        if self.target_params is not None and self.target_params < 1:
            raise ValueError(f"--target-params must be positive, got {self.target_params}")
        if not 0.0 <= self.shrink_energy_eps < 1.0:
            raise ValueError(f"--shrink-energy-eps must be in [0, 1), got {self.shrink_energy_eps}")
        if not 0.0 <= self.resize_until <= 1.0:
            raise ValueError(f"--resize-until is a fraction of all steps in [0, 1], got {self.resize_until}")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return 0.5 * peak * (1.0 + math.cos(math.pi * t))


def budget_at(step: int, start_params: int, target: int | None, shrink_steps: int) -> int | None:
    """The parameter budget at ``step``: geometric from ``start_params`` to ``target``.

    Reaches ``target`` at ``shrink_steps`` and stays there; None when there is no target.
    """
    if target is None:
        return None
    if shrink_steps <= 0 or step >= shrink_steps or start_params <= target:
        return int(target)
    frac = step / shrink_steps
    return int(round(start_params * (target / start_params) ** frac))


@torch.no_grad()
def evaluate(
    model: nn.Module, data: DeviceDataset, batch_size: int = 1000, autocast: Any = None
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (eval mode, no augmentation).

    Returns:
        ``(accuracy in [0, 1], loss)``.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    try:
        for x, y in data.batches(batch_size, shuffle=False):
            with ctx():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    n = max(1, len(data))
    return correct.item() / n, loss_sum.item() / n


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event of a run's ``log.jsonl`` (a torn last line, from a crash, is skipped)."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {LOG_NAME} in {Path(run_dir).resolve()}: is this a run folder?")
    events = []
    with open(path) as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                logger.warning("skipping a torn last line of %s", path)
            else:
                raise
    return events


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    """Path of a run's latest checkpoint."""
    return Path(run_dir) / CKPT_NAME


def baseline_config(source: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """A config that trains run ``source``'s final architecture from scratch, without resizing.

    Same dataset, epochs, optimizer and schedule as the run; ``overrides`` replace fields
    (e.g. ``run_dir``, ``epochs``, ``device``).
    """
    run_dir = Path(source)
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {run_dir.resolve()}: not a run folder")
    with open(cfg_path) as fh:
        base = TrainConfig.from_json(json.load(fh)["config"])
    spec_path = run_dir / "final_spec.json"
    if spec_path.is_file():
        with open(spec_path) as fh:
            spec = json.load(fh)
    else:
        spec = ckpt_mod.load_checkpoint(last_checkpoint(run_dir))["spec"]
    base.spec = spec
    base.bn = None
    base.resize_every = 0
    base.target_params = None
    base.run_dir = None
    base.baseline_of = str(run_dir)
    for k, v in overrides.items():
        if v is not None:
            setattr(base, k, v)
    return base


@torch.no_grad()
def row_norm_snapshot(model: nn.Module) -> dict[str, tuple[tuple[int, ...], float]]:
    """Shape and RMS row norm of every BatchNorm-followed convolution (see :func:`renormalize_bn_convs_`)."""
    out = {}
    for name, conv, _ in conv_bn_pairs(model):
        w = conv.weight
        out[name] = (tuple(w.shape), float(w.reshape(w.shape[0], -1).norm(dim=1).pow(2).mean().sqrt()))
    return out


@torch.no_grad()
def renormalize_bn_convs_(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, before: dict[str, tuple[tuple[int, ...], float]]
) -> dict[str, float]:
    """Undo the weight-norm growth that a resize leaves in BatchNorm-followed convolutions.

    Folding pruned channels into a consumer (``A_K += A_D M``) inflates the consumer's rows,
    and over a long shrink they grew ~100x here. Behind a BatchNorm a row's scale does not
    change the function but divides its effective learning rate by the scale squared, which
    all but froze those layers. For every such convolution whose shape changed, each row is
    scaled back to the layer's RMS row norm from ``before`` (:func:`row_norm_snapshot` taken
    just before the resize), with the BatchNorm's running mean/var scaled to match (the
    function is unchanged in training mode, and in eval mode up to the BatchNorm's eps) and
    the optimizer's per-row state scaled as the gradients are (momentum and first moments by
    ``1/c``, second moments by ``1/c**2``).

    Returns:
        module name -> mean factor applied to its rows, for every rescaled convolution.
    """
    applied: dict[str, float] = {}
    for name, conv, bn in conv_bn_pairs(model):
        shape, target = before.get(name, (None, 0.0))
        w = conv.weight
        if shape is None or tuple(w.shape) == shape or not target > 0:
            continue
        rows = w.reshape(w.shape[0], -1).norm(dim=1)
        c = torch.where(rows > 0, target / rows.clamp_min(1e-30), torch.ones_like(rows))
        view = c.view(-1, *([1] * (w.dim() - 1)))
        w.mul_(view)
        if bn.running_mean is not None:
            bn.running_mean.mul_(c)
            bn.running_var.mul_(c * c)
        state = optimizer.state.get(w, {}) if optimizer is not None else {}
        for key, t in state.items():
            if isinstance(t, torch.Tensor) and t.shape == w.shape:
                if key in ("exp_avg_sq", "max_exp_avg_sq"):
                    t.div_(view * view)
                elif key in ("momentum_buffer", "exp_avg"):
                    t.div_(view)
        applied[name] = float(c.mean())
    return applied


# ----------------------------------------------------------------------------------------------
# internals


class _JsonlLog:
    """Appends one JSON object per line, flushed at once."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        rec = {"event": event, **fields}
        self.fh.write(json.dumps(rec, default=_json_default) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


@torch.no_grad()
def _probe_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training-mode loss on one batch, leaving every BatchNorm buffer as it was."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0  # running stats stay put
        return float(F.cross_entropy(model(x).float(), y))
    finally:
        for m, mom, nbt in saved:
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return dev


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr, wd = cfg.resolved_lr(), cfg.resolved_wd()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _make_resizer(cfg: TrainConfig, model: nn.Module, example: torch.Tensor, optimizer: torch.optim.Optimizer):
    try:
        from ..policy import Policy
        from ..resizer import Resizer
    except ImportError as exc:  # pragma: no cover - only while the resizer is being written
        raise RuntimeError(
            f"resizing needs svdgrow.resizer and svdgrow.policy, which failed to import ({exc}); "
            "run without resizing (--resize-every 0) or fix the installation"
        ) from exc
    kwargs = dict(cfg.policy)
    if cfg.energy_eps is not None:
        kwargs.setdefault("energy_eps", cfg.energy_eps)
    policy = Policy(**kwargs)
    return Resizer(model, example, policy=policy, optimizer=optimizer, mode=cfg.mode)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised from the SIGTERM handler: the run checkpoints, then stops (resume with --resume)."""


_Stop = TrainingInterrupted


def _setup_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run_dir is None:
        name = cfg.preset if cfg.spec is None else "spec"
        if cfg.baseline_of:
            name = f"baseline-{Path(cfg.baseline_of).name}"
        cfg.run_dir = os.path.join("runs", f"{cfg.dataset}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    return run


def _widths(model: nn.Module, resizer: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": layer_widths(spec_of(model))}
    if resizer is not None:
        try:
            out["groups"] = {str(k): int(v) for k, v in resizer.widths().items()}
        except Exception as exc:  # noqa: BLE001 - widths are informational
            logger.debug("resizer.widths() failed: %s", exc)
    return out


def train(cfg: TrainConfig | None = None, resume: str | os.PathLike | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run. See the module docstring for the run folder.

    Args:
        cfg: the run's config (ignored when ``resume`` is given, except ``overrides``).
        resume: a run folder to continue from its last checkpoint (log appended).
        overrides: when resuming, fields to change (e.g. ``epochs``, ``device``, ``data_dir``,
            ``threads``, ``progress``).

    Returns:
        a summary dict: ``run_dir``, ``params``, ``test_acc``, ``test_loss``, ``elapsed``,
        ``spec``, ``step``, ``epoch``.
    """
    resume_ckpt = None
    if resume is not None:
        run = Path(resume)
        cfg_path = run / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"cannot resume: no {CONFIG_NAME} in {run.resolve()}")
        with open(cfg_path) as fh:
            cfg = TrainConfig.from_json(json.load(fh)["config"])
        for k, v in (overrides or {}).items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.run_dir = str(run)
        resume_ckpt = ckpt_mod.load_checkpoint(last_checkpoint(run))
    elif cfg is None:
        cfg = TrainConfig()
    cfg.validate()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume_ckpt)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, resume_ckpt: dict[str, Any] | None) -> dict[str, Any]:
    device = _pick_device(cfg.device)
    run = _setup_run_dir(cfg)
    t_start = time.perf_counter()
    elapsed_before = 0.0

    # ---- data
    train_ds = load_dataset(cfg.dataset, True, device, cfg.data_dir, cfg.download, cfg.subset, cfg.seed)
    test_ds = load_dataset(cfg.dataset, False, device, cfg.data_dir, cfg.download, cfg.test_subset, cfg.seed)
    steps_per_epoch = train_ds.num_batches(cfg.batch_size, drop_last=len(train_ds) >= cfg.batch_size)
    drop_last = len(train_ds) >= cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    data_gen = torch.Generator(device=device)
    data_gen.manual_seed(cfg.seed)

    # ---- model, optimizer, resizer
    torch.manual_seed(cfg.seed)
    if resume_ckpt is not None:
        model, _ = ckpt_mod.load_model(resume_ckpt, device)
        model.train()
        named = dict(model.named_parameters())
        order = resume_ckpt["optimizer_param_names"]
        optimizer = _make_optimizer(cfg, [named[n] for n in order[0]])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        start_spec = json.load(open(run / CONFIG_NAME))["start_spec"]
    else:
        start_spec = cfg.starting_spec()
        model = build_model(start_spec).to(device).train()
        optimizer = _make_optimizer(cfg, list(model.parameters()))
    start_params = count_params(start_spec)
    lr_peak = cfg.resolved_lr()

    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        logger.warning("--amp only acts on CUDA; training in float32 on %s", device)
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    resizer = None
    if cfg.resize_every > 0:
        example = train_ds.batch(torch.arange(min(len(train_ds), 8), device=device))[0]
        resizer = _make_resizer(cfg, model, example, optimizer)

    # generators whose state a checkpoint carries (the resizer's draws grown directions)
    generators = {"data": data_gen}
    if isinstance(getattr(resizer, "_gen", None), torch.Generator):
        generators["resizer"] = resizer._gen

    step, epoch, batch_in_epoch = 0, 0, 0
    order: torch.Tensor | None = None
    epoch_stats = {"loss": 0.0, "correct": 0, "seen": 0}
    if resume_ckpt is not None:
        step, epoch = resume_ckpt["step"], resume_ckpt["epoch"]
        extra = resume_ckpt["extra"]
        elapsed_before = float(extra.get("elapsed", 0.0))
        batch_in_epoch = int(extra.get("batch_in_epoch", 0))
        epoch_stats = extra.get("epoch_stats", epoch_stats)
        if batch_in_epoch > 0 and "order" in resume_ckpt["rng"]:
            order = resume_ckpt["rng"]["order"].to(device)
        if resume_ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(resume_ckpt["scaler"])
        if resizer is not None and resume_ckpt["extra"].get("resizer_state") and hasattr(resizer, "load_state_dict"):
            resizer.load_state_dict(resume_ckpt["extra"]["resizer_state"])
        ckpt_mod.set_rng_state(resume_ckpt["rng"], generators)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    log = _JsonlLog(run / LOG_NAME)
    if resume_ckpt is None:
        with open(run / CONFIG_NAME, "w") as fh:
            json.dump({"config": cfg.to_json(), "start_spec": start_spec, "start_params": start_params,
                       "device": str(device), "torch": torch.__version__}, fh, indent=2)
        log.write("start", step=0, epoch=0, params=count_params(model), flops=count_flops(model),
                  widths=_widths(model, resizer), spec=spec_of(model), elapsed=elapsed(),
                  steps_per_epoch=steps_per_epoch, total_steps=total_steps, device=str(device))
    else:
        log.write("resume", step=step, epoch=epoch, params=count_params(model), elapsed=elapsed(),
                  batch_in_epoch=batch_in_epoch)
    logger.info("run folder %s: %s on %s, %d params, %d steps", run, cfg.dataset, device,
                count_params(model), total_steps)

    def save(final: bool = False) -> None:
        extra = {"elapsed": elapsed(), "batch_in_epoch": batch_in_epoch, "epoch_stats": epoch_stats,
                 "final": final}
        if resizer is not None and hasattr(resizer, "state_dict"):
            try:
                state = resizer.state_dict()
                json.dumps(state)
                extra["resizer_state"] = state
            except Exception:  # noqa: BLE001 - resizer state is optional and must be JSON-able
                pass
        rng = ckpt_mod.rng_state(generators)
        if order is not None and batch_in_epoch > 0:
            rng["order"] = order.cpu()
        ckpt_mod.save_checkpoint(run / CKPT_NAME, model, optimizer, {"step": step}, scaler if scaler.is_enabled() else None,
                                 step=step, epoch=epoch, rng=rng, extra=extra)

    resize_last = int(cfg.resize_until * total_steps)
    eps_after = resizer.policy.energy_eps if resizer is not None else None
    n_checks = 0
    last_ckpt_time = time.perf_counter()
    result: dict[str, Any] = {}
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, unit="step", desc=f"{cfg.dataset}")

    def on_term(signum, frame):  # noqa: ARG001
        raise _Stop()

    old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    test_acc, test_loss = float("nan"), float("nan")
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    correct_acc = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    try:
        while epoch < cfg.epochs:
            if order is None or batch_in_epoch == 0:
                order = torch.randperm(len(train_ds), device=device, generator=data_gen)
                epoch_stats = {"loss": 0.0, "correct": 0, "seen": 0}
            loss_acc = torch.zeros((), dtype=torch.float64, device=device)
            correct_acc = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            while batch_in_epoch < steps_per_epoch:
                lo = batch_in_epoch * cfg.batch_size
                idx = order[lo : lo + cfg.batch_size]
                x, y = train_ds.batch(idx, cfg.augment, cfg.shift, data_gen)
                lr = lr_at(step, total_steps, lr_peak, cfg.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                # drop the autograd graph now: it holds the parameters' AccumulateGrad nodes,
                # whose recorded shapes would go stale when the resizer changes a width
                loss, logits = loss.detach(), logits.detach()
                loss_acc += loss.detach().double() * y.shape[0]
                correct_acc += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                step += 1
                batch_in_epoch += 1

                if resizer is not None and step % cfg.resize_every == 0 and step <= resize_last:
                    budget = budget_at(step, start_params, cfg.target_params, cfg.shrink_steps)
                    shrinking = cfg.target_params is not None and step <= cfg.shrink_steps
                    resizer.policy.energy_eps = cfg.shrink_energy_eps if shrinking else eps_after
                    before = count_params(model)
                    norms = row_norm_snapshot(model) if cfg.renorm else {}
                    with autocast():
                        probe_before = _probe_loss(model, x, y)
                    t0 = time.perf_counter()
                    report = resizer.step(data=(x if cfg.mode == "data" else None), budget=budget)
                    renorm = renormalize_bn_convs_(model, optimizer, norms) if cfg.renorm else {}
                    t_resize = time.perf_counter() - t0
                    n_checks += 1
                    after = count_params(model)
                    rep = report.as_dict()
                    decisions = rep["decisions"]
                    if report.changed:
                        with autocast():
                            probe_after = _probe_loss(model, x, y)
                        log.write("resize", step=step, epoch=epoch + batch_in_epoch / steps_per_epoch,
                                  budget=budget, params_before=before, params=after,
                                  flops=count_flops(model), widths=_widths(model, resizer),
                                  decisions=[d for d in decisions if d.get("action") != "keep"],
                                  batch_loss_before=probe_before, batch_loss_after=probe_after,
                                  warnings=rep["warnings"], seconds=t_resize,
                                  seconds_by_stage=rep["seconds"], renorm=renorm,
                                  elapsed=elapsed(), lr=lr)

                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or batch_in_epoch == steps_per_epoch:
                        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}",
                                        acc=f"{(correct_acc.item() + epoch_stats['correct']) / max(1, seen + epoch_stats['seen']):.3f}",
                                        params=count_params(model), refresh=False)
                if cfg.checkpoint_minutes > 0 and time.perf_counter() - last_ckpt_time > 60 * cfg.checkpoint_minutes:
                    epoch_stats = _merge(epoch_stats, loss_acc, correct_acc, seen)
                    loss_acc.zero_(), correct_acc.zero_()
                    seen = 0
                    save()
                    last_ckpt_time = time.perf_counter()

            epoch_stats = _merge(epoch_stats, loss_acc, correct_acc, seen)
            loss_acc.zero_(), correct_acc.zero_()
            seen = 0
            epoch += 1
            batch_in_epoch = 0
            test_acc, test_loss = evaluate(model, test_ds, cfg.eval_batch_size, autocast if use_amp else None)
            n_seen = max(1, epoch_stats["seen"])
            params = count_params(model)
            log.write("epoch", step=step, epoch=epoch, params=params, flops=count_flops(model),
                      widths=_widths(model, resizer), train_acc=epoch_stats["correct"] / n_seen,
                      train_loss=epoch_stats["loss"] / n_seen, test_acc=test_acc, test_loss=test_loss,
                      lr=lr_at(step - 1, total_steps, lr_peak, cfg.warmup_steps), elapsed=elapsed(),
                      resize_checks=n_checks)
            if bar is not None:
                bar.write(f"epoch {epoch}/{cfg.epochs}: train acc {epoch_stats['correct'] / n_seen:.4f} "
                          f"test acc {test_acc:.4f} params {params:,} ({elapsed():.0f} s)")
            save(final=epoch == cfg.epochs)
            last_ckpt_time = time.perf_counter()
    except (KeyboardInterrupt, _Stop):
        logger.warning("interrupted at step %d: checkpointing to %s (resume with --resume %s)", step,
                       run / CKPT_NAME, run)
        epoch_stats = _merge(epoch_stats, loss_acc, correct_acc, seen)
        save()
        log.write("interrupted", step=step, epoch=epoch, elapsed=elapsed())
        log.close()
        if bar is not None:
            bar.close()
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if bar is not None:
        bar.close()
    final_spec = spec_of(model)
    with open(run / "final_spec.json", "w") as fh:
        json.dump(final_spec, fh, indent=2)
    result = {"run_dir": str(run), "params": count_params(model), "test_acc": test_acc, "test_loss": test_loss,
              "elapsed": elapsed(), "spec": final_spec, "step": step, "epoch": epoch,
              "widths": _widths(model, resizer)}
    log.write("end", **{k: v for k, v in result.items() if k != "run_dir"})
    log.close()
    try:
        from .plot import plot_run

        plot_run(run)
    except Exception as exc:  # noqa: BLE001 - plots must never fail a finished run
        logger.warning("plotting failed: %s", exc)
    return result


def _merge(stats: dict[str, Any], loss_acc: torch.Tensor, correct_acc: torch.Tensor, seen: int) -> dict[str, Any]:
    return {"loss": stats["loss"] + float(loss_acc.item()), "correct": stats["correct"] + int(correct_acc.item()),
            "seen": stats["seen"] + seen}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
