"""``cil-launch``: submit, watch and cancel stage chains (SLURM, local or debug executor).

cil-launch submit CHAIN.yaml --out RUN_DIR [--executor slurm|local|debug] [--set k=v ...]
                  [--wait] [--max-parallel N] [--seeds S ...]
cil-launch sweep SWEEP.yaml --out DIR [--executor slurm|local|debug] [--set k=v ...]
                 [--wait] [--max-parallel N] [--max-jobs N]
cil-launch status RUN_DIR [--json]
cil-launch cancel RUN_DIR [--grace S]
cil-launch report RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger("cil-launch")


def run_options(command: argparse.ArgumentParser, what: str, folder: str) -> None:
    """The options ``submit`` and ``sweep`` share."""
    command.add_argument("--out", required=True, help=folder)
    command.add_argument("--executor", default="local", choices=("slurm", "local", "debug"))
    command.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    command.add_argument("--wait", action="store_true", help=f"slurm: block until the {what} ends")
    command.add_argument(
        "--max-parallel", type=int, default=1, help="local: jobs running at once (default 1)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cil-launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="validate and submit (or resume) a chain")
    submit.add_argument("chain", help="configs/chains/*.yaml or a shipped chain name")
    run_options(submit, "chain", "run folder (chain.json, stages, logs)")
    submit.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="S",
        help="repeat the chain once per seed (a sweep over seed: reports give mean ± std)",
    )
    sweep = sub.add_parser("sweep", help="run a chain under many settings, shared jobs once")
    sweep.add_argument("sweep", help="configs/sweeps/*.yaml or a shipped sweep name")
    run_options(sweep, "sweep", "sweep folder (sweep.md, jobs, settings)")
    sweep.add_argument(
        "--max-jobs",
        type=int,
        default=0,
        metavar="N",
        help="slurm: at most N of the sweep's jobs in the queue at once (this command stays "
        "and submits the rest as jobs leave the queue; default: all at once)",
    )
    for name, text in (
        ("status", "states, failures and logs"),
        ("cancel", "cancel all"),
        ("report", "paper table (of a chain or a sweep)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run_dir")
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print chain.json")
        if name == "cancel":
            cmd.add_argument(
                "--grace",
                type=float,
                default=10.0,
                metavar="S",
                help="local: seconds between SIGINT, SIGTERM and SIGKILL (default 10)",
            )
    return parser


def format_status(chain_state) -> str:
    lines = [f"chain {chain_state.name} ({chain_state.executor}) in {chain_state.run_dir}"]
    width = max(len(n) for n in chain_state.jobs)
    for record in chain_state.jobs.values():
        line = f"  {record.name:<{width}}  {record.state:<9} job {record.job_id or '-':<8}"
        if record.attempts > 1:
            line += f" attempts {record.attempts}"
        if record.error:
            line += f"\n  {'':<{width}}  error: {record.error}"
        if record.state in ("FAILED", "RUNNING") and record.log:
            line += f"\n  {'':<{width}}  log: {record.log}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cil_dist.config import ConfigError
    from cil_dist.logs import setup_logging
    from launch import state as st
    from launch.chain import load_chain
    from launch.monitor import CancelIncomplete, cancel_chain, refresh, wait_for_chain
    from launch.report import write_report
    from launch.submit import submit_chain
    from launch.sweep import SWEEP_FILE
    from launch.sweep_report import write_sweep_report
    from launch.validate import ChainError

    args = build_parser().parse_args(argv)
    setup_logging(0)
    try:
        if args.command == "sweep" or (args.command == "submit" and args.seeds):
            return run_sweep(args)
        if args.command == "submit":
            chain = load_chain(args.chain, args.set)
            run_dir = Path(args.out).resolve()
            chain_state = submit_chain(
                chain, run_dir, args.executor, args.chain, max_parallel=args.max_parallel
            )
            if args.executor == "slurm" and args.wait:
                chain_state = wait_for_chain(run_dir)
            print(format_status(chain_state))
            if all(r.state in st.FINAL_STATES for r in chain_state.jobs.values()):
                print(write_report(chain, run_dir))
            return 0 if not any(r.state == st.FAILED for r in chain_state.jobs.values()) else 1
        run_dir = Path(args.run_dir)
        if args.command == "status":
            chain_state = refresh(st.ChainState.load(run_dir))
            text = json.dumps(asdict(chain_state), indent=1) if args.json else None
            print(text or format_status(chain_state))
            return 1 if any(r.state == st.FAILED for r in chain_state.jobs.values()) else 0
        if args.command == "cancel":
            print(format_status(cancel_chain(run_dir, args.grace)))
        elif (run_dir / SWEEP_FILE).is_file():
            print(write_sweep_report(run_dir))
        else:
            print(write_report(load_chain(run_dir / "chain.yaml"), run_dir))
    except CancelIncomplete as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: running jobs cancelled (see cil-launch status)")
        return 130
    except ChainError as exc:
        log.error("%s", exc)
        return 2
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """``cil-launch sweep`` (and ``submit --seeds``): run every setting, then report."""
    from launch import state as st
    from launch.monitor import wait_for_chain
    from launch.sweep import SweepConfig, load_sweep, submit_sweep
    from launch.sweep_report import write_sweep_report

    if args.command == "sweep":
        sweep, source = load_sweep(args.sweep, args.set), args.sweep
        max_jobs = args.max_jobs
    else:
        name = f"{Path(args.chain).stem}_seeds"
        sweep = SweepConfig(name=name, chain=args.chain, set=args.set, grid={"seed": args.seeds})
        source, max_jobs = args.chain, 0
    run_dir = Path(args.out).resolve()
    _, chain_state = submit_sweep(
        sweep, run_dir, args.executor, source, args.max_parallel, max_jobs
    )
    if args.executor == "slurm" and args.wait:
        chain_state = wait_for_chain(run_dir)
    print(format_status(chain_state))
    if all(r.state in st.FINAL_STATES for r in chain_state.jobs.values()):
        print(write_sweep_report(run_dir))
    return 0 if not any(r.state == st.FAILED for r in chain_state.jobs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
