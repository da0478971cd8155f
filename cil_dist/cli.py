"""``cil``: train a stage, evaluate a checkpoint, segment an image.

cil train --config NAME_OR_YAML [--set key=value ...]
cil eval  --checkpoint CKPT [--task-sets 1 2 12 3 123] [--split val] [--manifest URL]
          [--out DIR] [--export-predictions DIR] [--set key=value ...]
cil infer --checkpoint CKPT --image x.png [--ground-truth y_labelIds.png] --output-path DIR

Exit codes: 0 done; 2 a user or data error (one line naming the file, key, option or shard);
3 a collective timed out (``dist.timeout_s``: a hung or dead peer rank; one line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cil_dist.config import ConfigError, load_train_config
from cil_dist.training.stage import plan_run
from cil_dist.urls import redact_url

log = logging.getLogger("cil")

EXIT_USER = 2  # a user or data error: the config, an option, a file or a shard at fault
EXIT_TIMEOUT = 3  # a collective timed out (dist.timeout_s): a hung or dead peer rank


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cil", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one stage (plain, torchrun or SLURM task)")
    train.add_argument("--config", required=True, help="shipped name or YAML file")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")

    ev = sub.add_parser("eval", help="evaluate a checkpoint per task set")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--task-sets", nargs="*", default=None, help="e.g. 1 2 12 3 123")
    ev.add_argument("--split", default="val", help="manifest split (val, heldout, task1…)")
    ev.add_argument("--manifest", default=None, help="shards manifest (default: the run's)")
    ev.add_argument("--out", default=None, help="folder for metrics.json and table.md")
    ev.add_argument("--export-predictions", default=None, metavar="DIR")
    ev.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")

    inf = sub.add_parser("infer", help="segment one image")
    inf.add_argument("--checkpoint", required=True)
    inf.add_argument("--image", required=True)
    inf.add_argument("--ground-truth", default=None, help="*_gtFine_labelIds.png for metrics")
    inf.add_argument("--output-path", required=True)
    inf.add_argument("--task-set", default=None, help="restrict to a task set, e.g. 12")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cil_dist.logs import setup_logging

    setup_logging(0)
    try:  # a config's own mistakes end here, before torch's seconds-long import
        if args.command == "train":
            cfg = load_train_config(args.config, args.set, label="--set")
            plan_run(cfg)
    except ValueError as exc:  # ConfigError, ProtocolError
        log.error("%s", redact_url(str(exc)))
        return EXIT_USER
    from cil_dist.data.pipeline import DATA_ERRORS
    from cil_dist.distributed import CollectiveTimeout
    from cil_dist.training.checkpoint import CheckpointError

    try:
        if args.command == "train":
            from cil_dist.training.train import run_training

            run_training(cfg)
        elif args.command == "eval":
            run_eval(args)
        else:
            from cil_dist.evaluation.infer import infer

            result = infer(
                args.checkpoint, args.image, args.output_path, args.ground_truth, args.task_set
            )
            if "metrics" in result:
                print(metrics_tables(result["metrics"], Path(args.image).stem))
    except (ConfigError, CheckpointError, *DATA_ERRORS, FileNotFoundError, ValueError) as exc:
        log.error("%s", redact_url(str(exc)))  # a data error names a shard URL
        return EXIT_USER
    except CollectiveTimeout as exc:  # operational, not the user's: another exit code
        log.error("%s", redact_url(str(exc)))
        return EXIT_TIMEOUT
    return 0


def metrics_tables(results: dict, label: str) -> str:
    """The paper-shaped mIoU row and the per-class IoU of one image's metrics (stdout)."""
    from cil_dist.evaluation.tables import format_class_table, format_paper_table

    row = {name: result["miou"] for name, result in results.items()}
    table = format_paper_table({label: row}, tuple(results))
    names = list(dict.fromkeys(name for result in results.values() for name in result["iou"]))
    return f"{table}\n\n{format_class_table(results, names)}"


def run_eval(args: argparse.Namespace) -> None:
    from cil_dist.evaluation.evaluate import run_evaluation
    from cil_dist.training.checkpoint import load_checkpoint

    payload = load_checkpoint(args.checkpoint)
    overrides = list(args.set) + ([f"data.manifest={args.manifest}"] if args.manifest else [])
    cfg = load_train_config(None, overrides, base=payload.get("config"))
    run_evaluation(
        args.checkpoint,
        cfg,
        args.task_sets,
        args.split,
        Path(args.out) if args.out else None,
        Path(args.export_predictions) if args.export_predictions else None,
    )


if __name__ == "__main__":
    sys.exit(main())
