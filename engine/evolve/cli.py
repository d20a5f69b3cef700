"""`mergebot evolve SEARCH.yml OUT_DIR`: search a merge's coefficients with CMA-ES.

Errors a user can fix print as a message and exit with 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from engine.errors import MergeError

EXIT_ERROR = 1
EXIT_USAGE = 2

EPILOG = """\
search file (YAML):
  method: dare_ties                  # any registered method with numeric parameters
  base_model: ./models/base          # a local folder; the resident model is loaded from it
  models: [./models/a, ./models/b]
  parameters:                        # searched; per-model parameters get one value per model
    weight: {min: 0.0, max: 1.0}
    density: {min: 0.1, max: 1.0, layer_groups: 2}
  fixed: {lambda: 1.0}               # other method parameters
  dtype: bfloat16
  evaluation: {kind: perplexity, data: eval.txt, search_size: 64, report_size: 64}
  budget: {trials: 50, minutes: 120}
  seed: 0

OUT_DIR receives recipe.yml (the best recipe), model/ (merged with it), REPORT.md,
score_vs_trial.png and, unless --storage says otherwise, study.db. Run the same command
again to continue the study; start more workers with --worker on the same storage.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergebot evolve",
        description="Search merge coefficients with CMA-ES, merging in memory and scoring each trial.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("search", help="search file (YAML)")
    parser.add_argument("out_dir", help="output folder: best recipe, merged model, report")
    parser.add_argument(
        "--storage", default=None, help="SQLAlchemy URL of the study (default: OUT_DIR/study.db)"
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="search trials in the study (overrides the file)"
    )
    parser.add_argument(
        "--minutes", type=float, default=None, help="wall time of this run (overrides the file)"
    )
    parser.add_argument(
        "--worker", action="store_true", help="only run trials (another worker writes the results)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); give each of N workers on one machine cores/N",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every trial")
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: end like Ctrl-C, so the running trial is marked failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return EXIT_USAGE
        import torch

        torch.set_num_threads(args.threads)  # an application setting, made once here
    from engine.evolve.search import TrialEvent, run_search
    from engine.evolve.spec import Budget, load_search

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        spec = load_search(args.search)
        budget = spec.budget
        if args.trials is not None or args.minutes is not None:
            try:
                budget = Budget(
                    trials=args.trials if args.trials is not None else budget.trials,
                    minutes=args.minutes if args.minutes is not None else budget.minutes,
                )
            except ValueError as exc:
                print(f"error: --trials/--minutes: {exc}", file=sys.stderr)
                return EXIT_USAGE

        def progress(event: TrialEvent) -> None:
            what = f"baseline {event.baseline}" if event.baseline else "search"
            score = "failed" if event.score is None else f"{event.score:.6g}"
            print(
                f"trial {event.number:>4} ({what}): {score}  [merge {event.merge_seconds:.2f} s, "
                f"eval {event.eval_seconds:.2f} s]",
                flush=True,
            )

        result = run_search(
            spec,
            args.out_dir,
            storage=args.storage,
            budget=budget,
            worker_only=args.worker,
            device=args.device,
            progress=progress,
        )
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept; run the same command to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result is not None:
        validated = (
            f", {result.validation[result.best.number]:.6g} on the validation split "
            f"(the best of {len(result.validation)} finalists)"
            if result.validation
            else ""
        )
        print(
            f"best: trial {result.best.number}, {result.metric} {result.best.score:.6g} on the search split"
            f"{validated}, {result.held_out['best']:.6g} held out; wrote {', '.join(result.files)}"
        )
    return 0
