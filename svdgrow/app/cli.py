"""Command line: ``svdgrow train``, ``svdgrow plot RUN_DIR``, ``svdgrow summary RUN_DIR``.

Examples::

    svdgrow train --dataset mnist --preset mnist-2m --target-params 12000 --epochs 20
    svdgrow train --resume runs/mnist-mnist-2m-20240101-120000 --epochs 25
    svdgrow train --baseline-from runs/mnist-mnist-2m-20240101-120000
    svdgrow summary runs/mnist-mnist-2m-20240101-120000
    svdgrow plot runs/mnist-mnist-2m-20240101-120000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

logger = logging.getLogger("svdgrow")


def _int_or_float(text: str) -> int:
    """Parse 12500, 12.5k, 2e6, 2M."""
    t = text.strip().lower().replace("_", "")
    mult = 1
    if t.endswith("k"):
        mult, t = 1_000, t[:-1]
    elif t.endswith("m"):
        mult, t = 1_000_000, t[:-1]
    try:
        return int(round(float(t) * mult))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 12500, 12.5k or 2M, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``svdgrow`` command."""
    from .models import PRESETS

    p = argparse.ArgumentParser(
        prog="svdgrow",
        description="Train networks whose layer widths follow each layer's spectrum (SVD) while they train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train (and resize) a network; writes a run folder",
        description=(
            "Train a light ResNet on MNIST or Fashion-MNIST while svdgrow resizes its layer widths. "
            "Every unset flag takes the default shown (or, with --resume/--baseline-from, the "
            "value of that run)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    S = argparse.SUPPRESS  # noqa: N806 - unset flags stay out of the namespace
    g = t.add_argument_group("what to train")
    g.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default=S,
                   help="dataset (default mnist)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=S,
                   help="starting architecture (default quick; mnist-2m ~2.29M params, fashion-500k ~0.61M)")
    g.add_argument("--spec", metavar="FILE", default=S,
                   help="starting architecture from a JSON spec file (as final_spec.json of a run); "
                        "no resizing unless --resize-every is given")
    g.add_argument("--bn", choices=["on", "off"], default=S, help="force BatchNorm on or off (default: the spec's)")
    g.add_argument("--baseline-from", metavar="RUN_DIR", default=S,
                   help="train RUN_DIR's final architecture from scratch for the same epochs and "
                        "schedule, without resizing (a fixed-architecture baseline)")
    g.add_argument("--resume", metavar="RUN_DIR", default=S,
                   help="continue RUN_DIR from its last checkpoint (widths, optimizer, schedule, RNG, "
                        "log appended); only --epochs, --device, --data-dir, --threads, "
                        "--checkpoint-minutes and --no-progress may change")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help="passes over the training set (default 10)")
    g.add_argument("--batch-size", type=int, default=S, help="training batch size (default 128)")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default 0.05 sgd, 2e-3 adam/adamw)")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=S,
                   help="sgd = Nesterov momentum 0.9 (default sgd)")
    g.add_argument("--weight-decay", type=float, default=S,
                   help="weight decay (default 5e-4 sgd, 0 adam, 0.05 adamw)")
    g.add_argument("--warmup-steps", type=int, default=S, help="linear LR warm-up steps, then cosine to 0 (default 50)")
    g.add_argument("--label-smoothing", type=float, default=S, help="cross-entropy label smoothing (default 0)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=S,
                   help="turn off the random shifts (up to --shift px) of training images")
    g.add_argument("--shift", type=int, default=S, help="largest augmentation shift in pixels (default 2)")
    g = t.add_argument_group("resizing")
    g.add_argument("--resize-every", type=int, default=S,
                   help="call the resizer every N steps; 0 = never (default 20; 0 with --spec/--baseline-from)")
    g.add_argument("--resize-until", type=float, default=S,
                   help="stop resizing after this fraction of all steps, so the final net trains "
                        "undisturbed (default 0.6)")
    g.add_argument("--mode", choices=["weights", "data"], default=S,
                   help="pruning fold fitted on the current batch, or on moments predicted from the weights alone (default data)")
    g.add_argument("--target-params", type=_int_or_float, default=S,
                   help="global parameter budget to shrink to (e.g. 12000, 12k); the budget falls "
                        "geometrically from the start size over --shrink-steps, then caps growth")
    g.add_argument("--shrink-steps", type=int, default=S,
                   help="steps over which the budget reaches --target-params (default 600)")
    g.add_argument("--energy-eps", type=float, default=S,
                   help="energy policy epsilon after the budget schedule (or throughout without "
                        "--target-params): keep the directions holding 1-eps of a group's energy "
                        "(default: the Policy's, 0.01)")
    g.add_argument("--shrink-energy-eps", type=float, default=S,
                   help="energy epsilon while the budget schedule runs (default 0: the budget alone "
                        "decides, ranking channels network-wide; larger values add energy pruning, which "
                        "can cut far below the budget)")
    g.add_argument("--no-renorm", dest="renorm", action="store_false", default=S,
                   help="keep the row norms that folding leaves in BatchNorm-followed convolutions "
                        "(by default they are scaled back after every resize: function unchanged, "
                        "but inflated rows would otherwise all but stop learning)")
    g.add_argument("--policy", metavar="JSON", default=S,
                   help="extra Policy(...) keyword arguments as a JSON object, e.g. '{\"floor\": 4}'")
    g = t.add_argument_group("data, device, output")
    g.add_argument("--data-dir", default=S,
                   help="dataset root holding MNIST/raw or FashionMNIST/raw (default: $SVDGROW_DATA, "
                        "./data, ../shared/data; downloaded into it when missing)")
    g.add_argument("--no-download", dest="download", action="store_false", default=S,
                   help="never download: fail with the list of places searched")
    g.add_argument("--subset", type=int, default=S, help="train on a fixed random subset of N samples")
    g.add_argument("--test-subset", type=int, default=S, help="evaluate on a fixed random subset of N test samples")
    g.add_argument("--run-dir", default=S, help="run folder (default runs/<dataset>-<preset>-<time>)")
    g.add_argument("--device", default=S, help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument("--amp", action="store_true", default=S,
                   help="mixed precision on CUDA: bf16 autocast where supported, else fp16 + GradScaler")
    g.add_argument("--seed", type=int, default=S, help="seed of init, batch order and augmentation (default 0)")
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads (default: torch's)")
    g.add_argument("--checkpoint-minutes", type=float, default=S,
                   help="also checkpoint mid-epoch every M minutes; 0 = at epoch ends only (default 5)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")

    pl = sub.add_parser("plot", help="(re)draw a run's PNG plots from its log.jsonl")
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by svdgrow train")
    sm = sub.add_parser("summary", help="print a run's final params, accuracy, time and widths")
    sm.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by svdgrow train")
    sm.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


_RESUME_OK = ("epochs", "device", "data_dir", "threads", "checkpoint_minutes", "progress")


def _train(args: dict[str, Any]) -> int:
    from .loop import TrainConfig, baseline_config, train

    resume = args.pop("resume", None)
    baseline = args.pop("baseline_from", None)
    spec_file = args.pop("spec", None)
    if "bn" in args:
        args["bn"] = args["bn"] == "on"
    if "policy" in args:
        try:
            args["policy"] = json.loads(args["policy"])
        except json.JSONDecodeError as exc:
            raise SystemExit(f"svdgrow: --policy must be a JSON object: {exc}") from None
    if resume is not None:
        extra = sorted(set(args) - set(_RESUME_OK))
        if extra or baseline or spec_file:
            given = extra + (["baseline_from"] if baseline else []) + (["spec"] if spec_file else [])
            raise SystemExit(f"svdgrow: --resume keeps the run's settings; these flags cannot change "
                             f"on resume: {', '.join('--' + k.replace('_', '-') for k in given)}")
        result = train(resume=resume, overrides=args)
    elif baseline is not None:
        if spec_file:
            raise SystemExit("svdgrow: give either --baseline-from or --spec, not both")
        cfg = baseline_config(baseline, **args)
        result = train(cfg)
    else:
        if spec_file is not None:
            with open(spec_file) as fh:
                args["spec"] = json.load(fh)
            args.setdefault("resize_every", 0)
        cfg = TrainConfig(**args)
        result = train(cfg)
    print(f"done: {result['run_dir']}: {result['params']:,} params, test acc {100 * result['test_acc']:.2f}%, "
          f"{result['elapsed']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``svdgrow`` command.

    Args:
        argv: arguments (default ``sys.argv[1:]``); lets tests call ``main([...])`` in-process.

    Returns:
        the exit status (0 on success).
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(2, ns.verbose + 1)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("svdgrow").setLevel(level)
    # the resizer reports every step at INFO; show those only with -v
    logging.getLogger("svdgrow.resizer").setLevel(level if ns.verbose else logging.WARNING)
    args = {k: v for k, v in vars(ns).items() if k not in ("command", "verbose")}
    from .checkpoint import CheckpointError
    from .data import DataNotFoundError

    try:
        if ns.command == "train":
            try:
                return _train(args)
            except KeyboardInterrupt as exc:
                from .loop import TrainingInterrupted

                print("svdgrow: interrupted; the run was checkpointed: continue it with "
                      "svdgrow train --resume RUN_DIR", file=sys.stderr)
                return 143 if isinstance(exc, TrainingInterrupted) else 130
        if ns.command == "plot":
            from .plot import plot_run

            for path in plot_run(ns.run_dir):
                print(path)
            return 0
        if ns.command == "summary":
            from .plot import format_summary, summarize_run

            s = summarize_run(ns.run_dir)
            print(json.dumps(s, indent=2) if ns.json else format_summary(s))
            return 0
    except (DataNotFoundError, CheckpointError, FileNotFoundError, ValueError) as exc:
        logger.debug("error details", exc_info=True)
        print(f"svdgrow: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {ns.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
