"""`mergebot merge`, `mergebot check` and `mergebot extract-lora`: the engine's command line.

Errors a user can fix are printed as one line (or a short list) and exit with status 1;
usage errors exit with 2; a merge whose quality check (``--eval``) fails exits with 3, its output
folder kept for inspection. A traceback means a bug in mergebot.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from engine.errors import MergeError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_QUALITY = 3


def parse_size(text: str) -> int:
    """Sizes as mergekit writes them (``5B`` = 5 billion bytes) or with binary units (``500MiB``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgGtT]?)(i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size; write e.g. 5B, 500M or 2GiB")
    number, unit, binary = float(match[1]), match[2].upper(), (match[3] or "").lower() == "ib"
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}[unit]
    if binary:
        scale = {"": 1, "K": 2**10, "M": 2**20, "B": 2**30, "G": 2**30, "T": 2**40}[unit]
    return int(number * scale)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="mergekit YAML recipe")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="accept models that only have pickled .bin weights"
    )
    parser.add_argument(
        "--allow-crimes", action="store_true", help="accept models of different architectures"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergebot", description="Merge models from a mergekit YAML recipe.")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser(
        "merge", help="merge models into a folder", description="Merge models into OUT_DIR."
    )
    _common(merge)
    merge.add_argument("out_dir", help="output folder (created; written atomically)")
    merge.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    merge.add_argument(
        "--out-shard-size", type=parse_size, default="5B", help="bytes per shard, e.g. 5B, 500M, 2GiB"
    )
    merge.add_argument(
        "--seed", type=int, default=None, help="seed for random methods (overrides random_seed)"
    )
    merge.add_argument(
        "--dry-run", action="store_true", help="print the plan and exit without reading tensors"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    merge.add_argument(
        "--verify",
        action="store_true",
        help="before writing OUT_DIR, check that transformers builds the output's config and expects "
        "exactly its tensors (on the meta device: no weights are loaded)",
    )
    merge.add_argument(
        "--eval",
        action="store_true",
        help="after merging, check the output's quality against its parents (perplexity on a short "
        "text, greedy generations); a failing check exits with status 3 and keeps OUT_DIR",
    )
    merge.add_argument(
        "--report",
        action="store_true",
        help="also write the merge's anatomy into OUT_DIR: merge_report.json (per-layer parent shares, "
        "sign conflicts, dropped entries, cosines) and merge_anatomy.png",
    )
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tok = merge.add_mutually_exclusive_group()
    tok.add_argument(
        "--copy-tokenizer",
        dest="copy_tokenizer",
        action="store_true",
        default=True,
        help="copy the tokenizer to the output (default)",
    )
    tok.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false")
    # mergekit-yaml flags accepted so that copied commands keep working
    merge.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit compatibility)")
    merge.add_argument("--random-seed", dest="seed", type=int, help=argparse.SUPPRESS)
    for flag in (
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--trust-remote-code",
        "--write-model-card",
        "--no-lazy-unpickle",
        "--safe-serialization",
        "--clone-tensors",
        "--lora-merge-cache",
    ):
        merge.add_argument(
            flag, action="store_true" if flag != "--lora-merge-cache" else "store", help=argparse.SUPPRESS
        )

    check = commands.add_parser("check", help="audit a recipe's models", description="Audit compatibility.")
    _common(check)
    _extract_lora_parser(commands)
    return parser


def _extract_lora_parser(commands: Any) -> None:
    extract = commands.add_parser(
        "extract-lora",
        help="extract a PEFT LoRA adapter from a fine-tune and its base",
        description="Write a PEFT LoRA adapter to OUT: the truncated SVD of each weight's "
        "difference between --model and --base.",
    )
    extract.add_argument("out_path", nargs="?", help="adapter folder (created; written atomically)")
    extract.add_argument("--out-path", dest="out_path_flag", help=argparse.SUPPRESS)  # mergekit's spelling
    extract.add_argument("--base", "--base-model", dest="base", required=True, help="the base model")
    extract.add_argument("--model", required=True, help="the fine-tune")
    extract.add_argument(
        "--rank", "--max-rank", dest="rank", type=int, required=True, help="LoRA rank of every module"
    )
    extract.add_argument(
        "--rank-per-module",
        metavar="PATTERN=RANK,...",
        help="ranks for modules whose path ends with PATTERN, e.g. q_proj=8,v_proj=16",
    )
    extract.add_argument(
        "--modules-to-save",
        "--save-module",
        dest="modules_to_save",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="modules saved whole from the fine-tune (PEFT's modules_to_save), e.g. lm_head or norm",
    )
    embed = extract.add_mutually_exclusive_group()
    embed.add_argument(
        "--embed-lora",
        dest="embed_lora",
        action="store_true",
        default=True,
        help="embeddings get a LoRA (lora_embedding_A/B; default)",
    )
    embed.add_argument(
        "--no-embed-lora", dest="embed_lora", action="store_false", help="save embeddings whole instead"
    )
    extract.add_argument(
        "--include-regex", "-i", dest="include", action="append", default=[], help="only tensors matching"
    )
    extract.add_argument(
        "--exclude-regex", "-e", dest="exclude", action="append", default=[], help="skip tensors matching"
    )
    extract.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="of the factors"
    )
    extract.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    extract.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    extract.add_argument(
        "--allow-pickle", action="store_true", help="accept models that only have pickled .bin weights"
    )
    extract.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    extract.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")


def return_freed_memory_promptly() -> None:
    """Ask glibc to serve large blocks with mmap, so freed tensors go back to the system at once.

    By default glibc raises its mmap threshold after the first large free, after which
    tensor-sized blocks come from heap arenas (one per thread) and stay resident after
    being freed: a merge's RSS would settle at many times its working set. Smaller blocks
    (histograms, slices' partial results) stay in the heap once freed, up to a bound: trimmed
    at once, each was faulted in and zeroed again by the next slice. An application setting;
    the library itself leaves the allocator alone.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 8 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: Sequence[str] | None = None) -> int:
    return_freed_memory_promptly()
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        if args.command == "merge":
            return _merge(args)
        if args.command == "extract-lora":
            return _extract_lora(args)
        return _check(args)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _merge(args: argparse.Namespace) -> int:
    from engine.config import load_recipe
    from engine.run import MergeOptions, plan_merge, run_merge

    if getattr(args, "trust_remote_code", False):
        print(
            "note: --trust-remote-code is ignored; mergebot never runs code from model repos", file=sys.stderr
        )
    config = load_recipe(args.recipe)
    options = MergeOptions(
        device="cuda" if args.cuda else args.device,
        out_shard_size=args.out_shard_size,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
        copy_tokenizer=args.copy_tokenizer,
        overwrite=args.overwrite,
        base_dir=os.path.dirname(os.path.abspath(args.recipe)),
        verify=args.verify,
        report=args.report,
    )
    _audit(config, options, args.allow_crimes)
    if args.dry_run:
        plan = plan_merge(config, options)
        _print_plan(plan)
        for note in plan.notes:
            print(f"note: {note}")
        return 0

    from tqdm import tqdm

    bar = tqdm(total=0, unit="tensor", disable=args.no_progress, desc="merging", dynamic_ncols=True)

    def progress(done: int, total: int, message: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str(message[-48:], refresh=False)
        bar.update(done - bar.n)  # tqdm throttles redraws itself

    try:
        result = run_merge(config, args.out_dir, options=options, progress=progress)
    finally:
        bar.close()
    shards = f"{len(result.shards)} shard" + ("s" if len(result.shards) > 1 else "")
    print(
        f"merged {result.tensors} tensors ({_human(result.bytes_written)} in {shards}) into {result.out_path}"
    )
    for note in result.notes:
        print(f"note: {note}")
    if args.eval:
        return _evaluate(config, str(result.out_path), options)
    return 0


def _evaluate(config: object, out_dir: str, options: object) -> int:
    from engine.config import MergeConfig
    from engine.quality import QualityOptions, check_quality
    from engine.run import MergeOptions

    assert isinstance(config, MergeConfig) and isinstance(options, MergeOptions)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per model is noise here
    print("checking the merge's quality...")
    report = check_quality(
        out_dir,
        config.referenced_models(),
        options=QualityOptions(device=options.device),
        base_dir=options.base_dir,
    )
    print(report.markdown())
    if report.passed:
        print(report.summary())
        return 0
    print(f"error: {report.summary()}", file=sys.stderr)
    print(f"note: the merged model is kept in {out_dir} for you to inspect", file=sys.stderr)
    return EXIT_QUALITY


def _audit(config: object, options: object, allow_crimes: bool) -> None:
    from engine.check import audit_models, raise_for_audit
    from engine.run import OpenModels

    with OpenModels(config, options) as opened:  # type: ignore[arg-type]
        raise_for_audit(audit_models(config, opened.metadata(), allow_crimes=allow_crimes))  # type: ignore[arg-type]


def _print_plan(plan: object) -> None:
    from engine.plan import MergePlan

    assert isinstance(plan, MergePlan)
    print(
        f"method: {plan.method.name}   tensors: {len(plan.tasks)}   "
        f"read: {_human(plan.bytes_to_read)}   write: {_human(plan.bytes_to_write)}"
    )
    for task in plan.tasks:
        inputs = ", ".join(
            f"{i.model}:{i.tensor}" + (" (base)" if n == task.base_index else "")
            for n, i in enumerate(task.inputs)
        )
        params = " ".join(f"{k}={_fmt(v)}" for k, v in task.params.items())
        per_model = "; ".join(
            " ".join(f"{k}={_fmt(v)}" for k, v in p.items()) for p in task.input_params if p
        )
        print(
            f"{task.name}  {task.dtype}{list(task.shape)}  <- {inputs}  [{params}{' | ' if per_model else ''}{per_model}]"
        )


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} TB"


def _check(args: argparse.Namespace) -> int:
    from engine.check import audit_models
    from engine.config import load_recipe
    from engine.run import MergeOptions, OpenModels

    config = load_recipe(args.recipe)
    options = MergeOptions(
        allow_pickle=args.allow_pickle, base_dir=os.path.dirname(os.path.abspath(args.recipe))
    )
    with OpenModels(config, options) as opened:
        audit = audit_models(config, opened.metadata(), allow_crimes=args.allow_crimes)
    header = ("model", "architecture", "layers", "hidden", "heads", "kv", "vocab", "dtype", "params")
    rows = [
        (
            r.model,
            r.architecture,
            r.layers,
            r.hidden_size,
            r.heads,
            r.kv_heads,
            r.vocab_size,
            r.dtype,
            f"{r.parameters / 1e6:.1f}M",
        )
        for r in audit.reports
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    for note in config.notes:
        print(f"note: {note}")
    if audit.ok:
        print("ok: the models are compatible")
        return 0
    for mismatch in audit.mismatches:
        print(f"error: {mismatch}", file=sys.stderr)
    if audit.plan_error:
        print(f"error: {audit.plan_error}", file=sys.stderr)
    return EXIT_ERROR


def _extract_lora(args: argparse.Namespace) -> int:
    from engine.extract_lora import ExtractOptions, extract_lora, parse_rank_per_module

    out = args.out_path or args.out_path_flag
    if not out or (args.out_path and args.out_path_flag):
        raise MergeError("give the adapter's folder once: `mergebot extract-lora ... OUT`")
    options = ExtractOptions(
        rank=args.rank,
        rank_per_module=parse_rank_per_module(args.rank_per_module) if args.rank_per_module else {},
        modules_to_save=tuple(n for item in args.modules_to_save for n in item.split(",") if n.strip()),
        embed_lora=args.embed_lora,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
    )
    from tqdm import tqdm

    bar = tqdm(total=0, unit="tensor", disable=args.no_progress, desc="extracting", dynamic_ncols=True)

    def progress(done: int, total: int, message: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str(message[-48:], refresh=False)
        bar.update(done - bar.n)

    try:
        result = extract_lora(args.base, args.model, out, options, progress=progress)
    finally:
        bar.close()
    errors = [m.relative_error for m in result.modules]
    worst = max(errors, default=0.0)
    print(
        f"extracted {len(result.modules)} LoRA modules and {len(result.saved)} whole tensors "
        f"({_human(result.bytes_written)}) into {result.out_path}; relative error mean "
        f"{sum(errors) / max(len(errors), 1):.3g}, worst {worst:.3g}"
    )
    for note in result.notes:
        print(f"note: {note}")
    return 0
