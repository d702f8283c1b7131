"""The Torch-Pruning baseline of the frontier: global group-magnitude pruning of the large preset.

The same recipe as ``svdgrow train`` (data, augmentation, batch order, optimizer, warm-up and
cosine schedule, epochs, per-epoch evaluation; taken from :mod:`svdgrow.app`), but the widths
are cut by Torch-Pruning's ``MagnitudePruner`` (global pruning, ``GroupMagnitudeImportance``
with p=2, the classifier kept) instead of svdgrow: every ``--prune-every`` steps until
``--shrink-steps``, down to the same geometric parameter budget ``svdgrow.policy.budget_at``
gives svdgrow's shrink, and the optimizer is built anew after each pruning step (the optimizer
state of pruned tensors is lost, as it is for Torch-Pruning's users). Writes ``summary.json``
(and ``final_spec.json``) into ``--run-dir``. Needs ``pip install -r requirements-bench.txt``.

    python benchmarks/tp_train.py --dataset mnist --target-params 6000 --seed 0 \\
        --run-dir runs/tp-6000-s0 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from svdgrow.app.config import TrainConfig, lr_at
from svdgrow.app.data import load_dataset
from svdgrow.app.measure import evaluate
from svdgrow.app.models import build_model, count_flops, count_params, preset_spec, spec_of
from svdgrow.app.state import make_optimizer
from svdgrow.policy import budget_at

PRESET = {"mnist": "mnist-2m", "fashion-mnist": "fashion-500k"}


def prune_to(model: torch.nn.Module, example: torch.Tensor, target: float) -> int:
    """Cut ``model`` with one global magnitude step (repeated while above ``target``
    parameters); returns the passes made."""
    import torch_pruning as tp  # noqa: PLC0415 - optional benchmark dependency

    passes, training = 0, model.training
    while count_params(model) > target and passes < 8:
        # the channel fraction that removes the parameter excess if every layer shrank alike
        ratio = min(0.9, 1.0 - (target / count_params(model)) ** 0.5)
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True, pruning_ratio=max(ratio, 1e-3), max_pruning_ratio=0.95,
            ignored_layers=[model.head],
        )  # fmt: skip
        before = count_params(model)
        pruner.step()
        passes += 1
        if count_params(model) == before:
            break
    # Torch-Pruning traces the model in eval mode and leaves it there; a loop that sets train()
    # once per epoch would then train with BatchNorm on stale running statistics (it diverges)
    model.train(training)
    return passes


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=sorted(PRESET), default="mnist")
    p.add_argument("--target-params", type=int, required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--shrink-steps", type=int, default=300)
    p.add_argument("--prune-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = TrainConfig(dataset=args.dataset, epochs=args.epochs, seed=args.seed)
    common = {"device": "cpu", "data_dir": args.data_dir, "download": False}
    train_ds = load_dataset(args.dataset, train=True, subset=args.subset, subset_seed=args.seed,
                            **common)  # fmt: skip
    test_ds = load_dataset(args.dataset, train=False, subset=args.test_subset,
                           subset_seed=args.seed, **common)  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    spec = preset_spec(PRESET[args.dataset])
    model = build_model(spec).train()
    start_params = count_params(model)
    optimizer = make_optimizer(cfg, list(model.parameters()))
    example = train_ds.batch(torch.arange(8))[0]
    steps_per_epoch = train_ds.num_batches(cfg.batch_size, drop_last=True)
    total, step, log = steps_per_epoch * args.epochs, 0, []
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_ds), generator=gen)
        for b in range(steps_per_epoch):
            x, y = train_ds.batch(order[b * cfg.batch_size : (b + 1) * cfg.batch_size],
                                  augment=cfg.augment, shift=cfg.shift, generator=gen)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg.resolved_lr(), cfg.warmup_steps)
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.prune_every == 0 and step <= args.shrink_steps:
                target = budget_at(step, start_params, args.target_params, args.shrink_steps)
                if count_params(model) > target:
                    prune_to(model, example, target)
                    optimizer = make_optimizer(cfg, list(model.parameters()))  # as TP users do
        acc, test_loss = evaluate(model, test_ds, cfg.eval_batch_size)
        log.append({"epoch": epoch + 1, "test_acc": acc, "params": count_params(model),
                    "elapsed": time.perf_counter() - t_start})  # fmt: skip
        print(f"epoch {epoch + 1}: test acc {acc:.4f} params {count_params(model):,}", flush=True)
    model.eval()
    summary = {
        "finished": True, "params": count_params(model), "test_acc": acc, "test_loss": test_loss,
        "elapsed": time.perf_counter() - t_start, "start_params": start_params,
        "flops": count_flops(model), "per_epoch": log, "torch_pruning": _tp_version(),
    }  # fmt: skip
    out = Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "final_spec.json").write_text(json.dumps(spec_of(model), indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def _tp_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("torch-pruning")


if __name__ == "__main__":
    sys.exit(main())
