"""Command line: ``svdgrow train``, ``svdgrow plot RUN_DIR``, ``svdgrow summary RUN_DIR``.

Examples::

    svdgrow train --dataset mnist
    svdgrow train --dataset mnist --target-params 3000
    svdgrow train --dataset mnist --preset mnist-2m --target-params 12000 --epochs 20
    svdgrow train --resume runs/mnist-mnist-2m-20240101-120000 --epochs 25
    svdgrow train --baseline-from runs/mnist-mnist-2m-20240101-120000
    svdgrow summary runs/mnist-mnist-2m-20240101-120000
    svdgrow plot runs/mnist-mnist-2m-20240101-120000
    torchrun --nproc_per_node 2 -m svdgrow train --preset quick --run-dir runs/ddp

Every user error (a bad flag, a missing or corrupt file, an unusable device, a diverged run)
ends in one line on stderr and exit status 2. Ctrl-C or SIGTERM stops a run after its current
step with a checkpoint (exit status 130 or 143); a second one aborts at once. Under torchrun a
failure on one process (a resize, a checkpoint write, a peer gone past --dist-timeout) ends every
process with one line naming the rank and the error, exit status 1; ``torchrun --max-restarts
N`` then restarts the run, which continues from its --run-dir's last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from svdgrow import Policy

from .checkpoint import CheckpointError
from .config import DEFAULT_LR, DEFAULT_WD, RECIPES, TrainConfig
from .loop import RunFailed, TrainingInterrupted, train
from .models import PRESETS
from .parallel import Launch, error_line
from .plot import format_summary, plot_run, summarize_run
from .rundir import baseline_config, read_json
from .start import restart_resumes

__all__ = ["build_parser", "main", "new_run_config"]

logger = logging.getLogger("svdgrow")

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # policy: MISSING
_RESUME_OK = ("epochs", "device", "data_dir", "threads", "checkpoint_minutes", "progress",
              "compile", "backend", "dist_timeout")  # fmt: skip
_USER_ERRORS = (ValueError, OSError, CheckpointError, FloatingPointError)
"""What the CLI reports in one line with exit status 2 (DataNotFoundError is an OSError)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    """Parse a count: 12500, 12.5k, 2e6, 2M."""
    t = text.strip().lower().replace("_", "")
    mult = 1
    if t.endswith("k"):
        mult, t = 1_000, t[:-1]
    elif t.endswith("m"):
        mult, t = 1_000_000, t[:-1]
    try:
        return int(round(float(t) * mult))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"expected a count such as 12500, 12.5k or 2M, got {text!r}"
        ) from None


def _per_optimizer(values: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {name}" for name, v in values.items())


def _flag(group: Any, flag: str, help: str, dest: str | None = None, **kwargs: Any) -> None:
    """Add ``flag`` for a TrainConfig field; its help ends with the field's default."""
    dest = dest or flag[2:].replace("-", "_")
    default = _DEFAULTS[dest]
    if kwargs.get("action") is None and isinstance(default, (str, int, float)):
        help = f"{help} (default {default})"
    group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``svdgrow`` command."""
    p = _Parser(
        prog="svdgrow",
        description="Train networks whose layer widths follow each layer's spectrum (SVD).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    t = sub.add_parser(
        "train",
        help="train (and resize) a network; writes a run folder",
        description=(
            "Train a light ResNet on MNIST or Fashion-MNIST while svdgrow resizes its layer "
            "widths. Without --preset or --spec the dataset's tuned recipe runs: "
            + "; ".join(f"{d}: {_as_flags(r)}" for d, r in RECIPES.items())
            + ". Otherwise every unset flag takes the default shown (or, with --resume or "
            "--baseline-from, the value of that run)."
        ),
    )
    _what_to_train(t.add_argument_group("what to train"))
    _optimisation(t.add_argument_group("optimisation"))
    _resizing(t.add_argument_group("resizing"))
    _data_device_output(t.add_argument_group("data, device, output"))
    pl = sub.add_parser("plot", help="(re)draw a run's PNG plots from its log.jsonl")
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by svdgrow train")
    sm = sub.add_parser("summary", help="print a run's final params, accuracy, time and widths")
    sm.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by svdgrow train")
    sm.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _as_flags(settings: dict[str, Any]) -> str:
    """``{"target_params": 6000}`` -> ``--target-params 6000`` (numbers in short form)."""
    return " ".join(f"--{k.replace('_', '-')} {v if isinstance(v, str) else format(v, 'g')}"
                    for k, v in settings.items())  # fmt: skip


def _what_to_train(g: Any) -> None:
    S = argparse.SUPPRESS  # noqa: N806 - unset flags stay out of the namespace
    _flag(g, "--dataset", "dataset", choices=["mnist", "fashion-mnist"])
    _flag(g, "--preset", "starting architecture (mnist-2m ~2.29M params, fashion-500k ~0.61M)",
          choices=sorted(PRESETS))  # fmt: skip
    g.add_argument("--spec", metavar="FILE", default=S,
                   help="starting architecture from a JSON spec file (as final_spec.json of a "
                        "run); no resizing unless --resize-every is given")  # fmt: skip
    g.add_argument("--bn", choices=["on", "off"], default=S,
                   help="force BatchNorm on or off (default: the spec's)")  # fmt: skip
    g.add_argument("--baseline-from", metavar="RUN_DIR", default=S,
                   help="train RUN_DIR's final architecture from scratch for the same epochs "
                        "and schedule, without resizing (a fixed-architecture baseline)")  # fmt: skip
    g.add_argument("--resume", metavar="RUN_DIR", default=S,
                   help="continue RUN_DIR from its last checkpoint (widths, optimizer, schedule, "
                        "RNG, log appended) on as many processes as it trained on; only --epochs, "
                        "--device, --data-dir, --threads, --checkpoint-minutes, --no-progress, "
                        "--compile, --backend and --dist-timeout may change")  # fmt: skip


def _optimisation(g: Any) -> None:
    _flag(g, "--epochs", "passes over the training set", type=int)
    _flag(g, "--batch-size", "training batch size per process (under torchrun the global batch "
          "is this times the number of processes)", type=int)  # fmt: skip
    _flag(g, "--lr", f"peak learning rate (default {_per_optimizer(DEFAULT_LR)})", type=float)
    _flag(g, "--optimizer", "sgd = Nesterov momentum 0.9", choices=["sgd", "adam", "adamw"])
    _flag(g, "--weight-decay", f"weight decay (default {_per_optimizer(DEFAULT_WD)})", type=float)
    _flag(g, "--warmup-steps", "linear LR warm-up steps, then cosine to 0", type=int)
    _flag(g, "--label-smoothing", "cross-entropy label smoothing", type=float)
    _flag(g, "--distill", "weight W of a distillation loss once the budget starts to fall: "
          "the network just before its first shrinking resize becomes a frozen teacher and "
          "the loss is (1-W) CE + W T^2 KL(teacher || student); 0 = off", type=float,
          metavar="W")  # fmt: skip
    _flag(g, "--distill-temperature", "the distillation temperature T", type=float)
    _flag(g, "--no-augment", "turn off the random shifts (up to --shift px) of training images",
          dest="augment", action="store_false")  # fmt: skip
    _flag(g, "--shift", "largest augmentation shift in pixels", type=int)


def _resizing(g: Any) -> None:
    policy_eps = next(f.default for f in dataclasses.fields(Policy) if f.name == "energy_eps")
    _flag(g, "--resize-every", "call the resizer every N steps; 0 = never, the default with "
          "--spec and --baseline-from", type=int)  # fmt: skip
    _flag(g, "--resize-until", "stop resizing after this fraction of all steps, so the final "
          "net trains undisturbed", type=float)  # fmt: skip
    _flag(g, "--resize-backoff", "once the budget schedule is over, each check that changes "
          "nothing doubles the gap to the next, up to N x --resize-every steps (a change "
          "returns to --resize-every); 1 = check at the same pace throughout",
          type=int, metavar="N")  # fmt: skip
    _flag(g, "--mode", "fit the pruning fold on the current batch (data) or on moments "
          "predicted from the weights alone (weights)", choices=["weights", "data"])  # fmt: skip
    _flag(g, "--spectrum", "what the width policy reads: each group's weight spectrum "
          "(weights) or the spectrum of what its consumers read on it, after BatchNorm and the "
          "activation, on the current batch (features; needs --mode data)",
          choices=["weights", "features"])  # fmt: skip
    _flag(g, "--hold-grown", "after a layer grows, do not prune it below the width it grew to "
          "for this many resizes (new channels start unused; with --spectrum features a "
          "growing run otherwise prunes and regrows them); 0 = no hold", type=int)  # fmt: skip
    _flag(g, "--target-params", "global parameter budget (e.g. 12000, 12k); it moves "
          "geometrically from the start size over --shrink-steps: falls when the network "
          "starts larger (a shrinking run), rises when it starts smaller (a growing run, which "
          "grows its fullest layers to fill it)", type=_count)  # fmt: skip
    _flag(g, "--target-mflops", "a second budget, forward MFLOPs per sample (e.g. 0.3): it falls "
          "from the starting network's FLOPs on the same schedule as --target-params, and the "
          "widths must fit both", type=float)  # fmt: skip
    _flag(g, "--shrink-steps", "steps over which the budget reaches --target-params", type=int)
    _flag(g, "--shrink-start", "step at which the budget starts falling (until then it is the "
          "starting size: the network trains at full width first)", type=int)  # fmt: skip
    _flag(g, "--start-scale", "start from the preset (or --spec) narrowed uniformly to F times "
          "--target-params parameters, then shrink to the budget (F > 1) or grow to it (F < 1, "
          "e.g. 0.25: the budget then rises over --shrink-steps and fills up; the recipe then "
          "reads feature spectra with --hold-grown 5); never widened past the architecture (a "
          "warning says when that caps the start); default: the architecture as it is", type=float,
          metavar="F")  # fmt: skip
    _flag(g, "--energy-eps", "energy policy epsilon after the budget schedule (or throughout "
          "without --target-params): keep the directions holding 1-eps of a group's energy "
          f"(default: the Policy's, {policy_eps})", type=float)  # fmt: skip
    _flag(g, "--shrink-energy-eps", "energy epsilon while the budget schedule runs: 0 lets the "
          "budget alone decide, ranking channels network-wide; larger values add energy "
          "pruning, which can cut far below the budget", type=float)  # fmt: skip
    _flag(g, "--no-renorm", "keep the row norms that folding leaves in BatchNorm-followed "
          "convolutions (by default they are scaled back after every resize: same function, "
          "but inflated rows would all but stop learning)", dest="renorm",
          action="store_false")  # fmt: skip
    _flag(g, "--round-to", "keep every width a resize moves a layer to on a multiple of N "
          "(convolution kernels run blocks of 8 or 16 channels: an aligned network trains "
          "faster for its FLOPs; benchmarks/bench_widths.py); 1 = any width", type=int,
          metavar="N")  # fmt: skip
    _flag(g, "--round-after-shrink", "with --round-to: free widths while the budget schedule "
          "runs, then every layer moved to a multiple of N (down or up, within the budget) at "
          "the first resize after it", action="store_true")  # fmt: skip
    _flag(g, "--policy", "extra svdgrow.Policy(...) settings as a JSON object, e.g. "
          "'{\"min_width\": 4}'", metavar="JSON")  # fmt: skip


def _data_device_output(g: Any) -> None:
    _flag(g, "--data-dir", "dataset root holding MNIST/raw or FashionMNIST/raw (default: "
          "$SVDGROW_DATA, ./data, ../shared/data; downloaded into it when missing)")  # fmt: skip
    _flag(g, "--no-download", "never download: fail with the list of places searched",
          dest="download", action="store_false")  # fmt: skip
    _flag(g, "--subset", "train on a fixed random subset of N samples", type=int)
    _flag(g, "--test-subset", "evaluate on a fixed random subset of N test samples", type=int)
    _flag(g, "--run-dir", "run folder (default runs/<dataset>-<preset>-<time>)")
    _flag(g, "--device", "cpu, cuda, cuda:N or auto")
    _flag(g, "--amp", "mixed precision on CUDA: bf16 autocast where supported, else fp16 with "
          "a GradScaler", action="store_true")  # fmt: skip
    _flag(g, "--seed", "seed of init, batch order, augmentation and the resizer", type=int)
    _flag(g, "--threads", "torch CPU threads (default: torch's)", type=int)
    _flag(g, "--checkpoint-minutes", "also checkpoint mid-epoch every M minutes; 0 = at epoch "
          "ends only", type=float)  # fmt: skip
    _flag(g, "--no-progress", "no progress bar", dest="progress", action="store_false")
    _flag(g, "--compile", "train through torch.compile with BACKEND (default inductor); the "
          "graphs are compiled again after every change of width", nargs="?",
          const="inductor", metavar="BACKEND")  # fmt: skip
    _flag(g, "--backend", "process group backend under torchrun (default: gloo for cpu, nccl "
          "for cuda)", choices=["gloo", "nccl"])  # fmt: skip
    _flag(g, "--dist-timeout", "under torchrun: seconds before a collective that a dead or hung "
          "process never joins fails the others", type=float)  # fmt: skip


def _train(args: dict[str, Any]) -> int:
    resume = args.pop("resume", None)
    baseline = args.pop("baseline_from", None)
    spec_file = args.pop("spec", None)
    if "bn" in args:
        args["bn"] = args["bn"] == "on"
    if "policy" in args:
        try:
            args["policy"] = json.loads(args["policy"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"--policy must be a JSON object: {exc}") from None
    launch = Launch.from_env()
    if resume is None and baseline is None and restart_resumes(args.get("run_dir"), launch):
        logger.warning("torchrun restart %d: resuming %s from its last checkpoint",
                       launch.restart, args["run_dir"])  # fmt: skip
        resume, spec_file = args.pop("run_dir"), None
        args = {k: v for k, v in args.items() if k in _RESUME_OK}
    if resume is not None:
        given = sorted(set(args) - set(_RESUME_OK)) + ["baseline_from"] * bool(baseline)
        given += ["spec"] * bool(spec_file)
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(
                f"--resume keeps the run's settings; these flags cannot change: {flags}"
            )
        result = train(resume=resume, overrides=args)
    elif baseline is not None:
        if spec_file:
            raise ValueError("give either --baseline-from or --spec, not both")
        result = train(baseline_config(baseline, **args))
    else:
        result = train(new_run_config(args, spec_file))
    if launch.rank == 0:
        print(f"done: {result['run_dir']}: {result['params']:,} params, test acc "
              f"{100 * result['test_acc']:.2f}%, {result['elapsed']:.0f} s")  # fmt: skip
    return 0


#: ``--hold-grown`` of a growing recipe run (``--start-scale`` below 1).
GROW_HOLD = 5


def new_run_config(args: dict[str, Any], spec_file: str | None = None) -> TrainConfig:
    """The config of a new run from the flags given: with neither ``--preset`` nor ``--spec``,
    the dataset's recipe (:data:`svdgrow.app.config.RECIPES`) fills the flags not given."""
    args = dict(args)
    if spec_file is not None:
        args["spec"] = read_json(spec_file, "spec file")
        args.setdefault("resize_every", 0)
    elif "preset" not in args:
        recipe = dict(RECIPES[args.get("dataset", _DEFAULTS["dataset"])])
        if args.get("resize_every") == 0:  # no resizing asked for: the preset as it is
            recipe = {k: v for k, v in recipe.items() if k in ("preset", "epochs")}
        if args.get("mode", _DEFAULTS["mode"]) != "data":  # features are measured on the batch
            recipe.pop("spectrum", None)
        growing = args.get("start_scale", recipe.get("start_scale", 1.0)) < 1
        if growing and args.get("mode", _DEFAULTS["mode"]) == "data":
            # a growing run reads feature spectra, grows past the weight cap and holds what it
            # grew for GROW_HOLD resizes (docs/design.md, "Growth": measured better than
            # growing on weight spectra); --spectrum / --hold-grown override
            recipe.update(spectrum="features", hold_grown=GROW_HOLD)
        filled = {k: v for k, v in recipe.items() if k not in args}
        args.update(filled)
        cfg = TrainConfig(**args)
        cfg.validate()  # a bad flag is one error line, without the recipe line before it
        if filled:
            logger.info("the %s recipe: %s", cfg.dataset, _as_flags(filled))
        return cfg
    return TrainConfig(**args)


def _plot(args: dict[str, Any]) -> int:
    for path in plot_run(args["run_dir"]):
        print(path)
    return 0


def _summary(args: dict[str, Any]) -> int:
    s = summarize_run(args["run_dir"])
    print(json.dumps(s, indent=2) if args["json"] else format_summary(s))
    return 0


_COMMANDS = {"train": _train, "plot": _plot, "summary": _summary}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``svdgrow`` command.

    Args:
        argv: arguments (default ``sys.argv[1:]``); lets tests call ``main([...])`` in-process.

    Returns:
        the exit status: 0 on success, 2 on a user error, 130/143 when interrupted.
    """
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad command line (2, message printed)
        return int(exc.code or 0)
    level = logging.WARNING - 10 * min(2, ns.verbose + 1)
    if os.environ.get("RANK", "0") != "0" and not ns.verbose:  # torchrun: rank 0 tells
        level = logging.WARNING
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("svdgrow").setLevel(level)
    # the resizer reports every step at INFO; show those only with -v
    logging.getLogger("svdgrow.resizer").setLevel(level if ns.verbose else logging.WARNING)
    args = {k: v for k, v in vars(ns).items() if k not in ("command", "verbose")}
    try:
        return _COMMANDS[ns.command](args)
    except TrainingInterrupted as exc:
        launch = Launch.from_env()
        how = (
            f"torchrun --nproc_per_node {launch.world_size} -m svdgrow"
            if launch.distributed
            else "svdgrow"
        )
        if launch.rank == 0:
            print(f"svdgrow: stopped by {signal.Signals(exc.signum).name} after a checkpoint; "
                  f"continue with: {how} train --resume {exc.run_dir}", file=sys.stderr)  # fmt: skip
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("svdgrow: aborted without a new checkpoint (a run folder resumes from its last "
              "one)", file=sys.stderr)  # fmt: skip
        return 130
    except RunFailed as exc:  # before the user errors: it is a RuntimeError, not one of them
        _print_error(exc)
        return 1
    except _USER_ERRORS as exc:
        _print_error(exc)
        return 2


def _print_error(exc: BaseException) -> None:
    """``svdgrow: error: ...`` in one line (``rank R: `` first under torchrun), unless the
    loop printed it already (:func:`svdgrow.app.parallel.report_error`)."""
    logger.debug("error details", exc_info=True)
    if not getattr(exc, "svdgrow_reported", False):
        print(error_line(exc, Launch.from_env()), file=sys.stderr)
