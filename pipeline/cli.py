"""The `layerbeam` command line.

    layerbeam run CONFIG [--set a.b=c ...] [--overwrite] [--unsafe-model] [BEAM FLAGS ...]
    layerbeam layers MODEL [--input-shape 224,224,3] [--match SELECTOR] [--reduce mean] [--json]
    layerbeam show OUTPUT [--rows 5] [--plot FILE.png]
    layerbeam verify OUTPUT [--sample N]

Exit codes: 0 the run was published (or the check passed); 1 the run did its work but
published nothing (no rows, too many dead letters, disk full) or `verify` found values
off; 2 a user error found before any work (config, flags, paths), printed as one line
(`layerbeam: error: …`) per problem. Beam's own flags (`--runner`, `--direct_num_workers`,
`--project` …) pass through; a flag neither layerbeam nor Beam knows is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import posixpath
import sys
from collections.abc import Sequence

from .transforms.errors import LayerbeamError, OutcomeError, first_line

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        # No prefixes: `--max-shard` must not quietly mean --max-shards, nor take a Beam flag's place.
        kw.setdefault("allow_abbrev", False)
        super().__init__(*a, **kw)

    def error(self, message):  # one line, exit 2, as everywhere else
        raise _UsageError(f"{message}; see `{self.prog} --help`")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layerbeam", description="Write Keras layer outputs for every example of a sharded dataset to Parquet or TFRecord.")
    p.add_argument("--version", action="version", version=f"layerbeam {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log lines: -v shows layerbeam's debug lines and TensorFlow's and Beam's own log")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="layerbeam's log level (default INFO; WARNING with -q)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], help="run a job from a YAML config", description="Run a job. Flags Beam knows go to Beam (e.g. --runner=DataflowRunner).")
    run.add_argument("config", help="YAML config file (see configs/demo.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. --set output.path=/tmp/out (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="build from scratch as a new lineage (a changed model or extraction config needs it); earlier versions stay readable until `vacuum`")
    run.add_argument("--unsafe-model", action="store_true", help="load .keras/.h5 files with Python code (Lambda layers); only for files you trust")
    run.add_argument("--max-shards", type=int, help="smoke run: only the first N shards")
    run.add_argument("--max-examples-per-shard", type=int, help="smoke run: at most N records per shard")
    run.add_argument("--plan-only", action="store_true", help="print the size plan and stop")
    run.add_argument("--max-dead-letter-fraction", type=float, metavar="F", help="fail (exit 1, nothing published) above this fraction of dead letters (output.max_dead_letter_fraction, default 0.1)")
    run.add_argument("-q", "--quiet", action="store_true", help="print only the summary (no size plan, no progress, warnings only)")

    layers = sub.add_parser("layers", parents=[common], help="list every tappable layer output of a model", description="List every tappable tensor: path, type, shape, bytes per example, parameters.")
    layers.add_argument("model", help="keras.applications.<Name>, a .keras/.h5 file, or module:function")
    layers.add_argument("--input-shape", help="input shape without batch, e.g. 224,224,3 (default: the model's)")
    layers.add_argument("--match", action="append", default=[], metavar="SELECTOR", help="show only what a selector matches, as layers.select would (exact path, glob, re:…, type:…, all; repeatable)")
    layers.add_argument("--include-inputs", action="store_true", help="let patterns match model inputs, as layers.include_inputs: true does")
    layers.add_argument("--reduce", default="none", choices=["none", "mean", "max", "flatten"], help="reduction used for the bytes column")
    layers.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="stored dtype used for the bytes column")
    layers.add_argument("--weights", default=None, help="keras.applications weights (default: none, random)")
    layers.add_argument("--unsafe-model", action="store_true", help="allow Lambda layers in .keras/.h5 files")
    layers.add_argument("--json", action="store_true", help="print one JSON document for scripts: {model, inputs, reduce, dtype, tensors: [...]}")

    show = sub.add_parser("show", parents=[common], help="summarize a finished output: model, outputs, partitions, files, first rows", description="Print an output's manifest summary and its first rows' keys and value statistics (Parquet or TFRecord).")
    show.add_argument("output", help="an output directory written by `layerbeam run` (local or fsspec URL)")
    show.add_argument("--rows", type=int, default=5, help="how many rows to show (default 5; 0 for none)")
    show.add_argument("--version", dest="at_version", type=int, metavar="N", help="an earlier version of the output (`layerbeam history` lists them)")
    show.add_argument("--plot", metavar="FILE.png", help="also draw each output's value histogram and statistics into this PNG (needs matplotlib: pip install 'layerbeam[plot]')")

    history = sub.add_parser("history", parents=[common], help="list an output's versions", description="List the versions of an output: number, created, parent, shards new/changed/reused/removed, rows.")
    history.add_argument("output", help="an output directory written by `layerbeam run`")
    vacuum = sub.add_parser("vacuum", parents=[common], help="delete history no kept version needs", description="Delete the files and manifests of versions older than the K newest from the output's history folder (never the latest version's files) and print what it frees.")
    vacuum.add_argument("output", help="an output directory written by `layerbeam run`")
    vacuum.add_argument("--keep", type=int, required=True, metavar="K", help="how many of the newest versions stay readable (at least 1: the latest)")

    verify = sub.add_parser("verify", parents=[common], help="recompute random rows with plain Keras and compare", description="Recompute N random rows of an output from its original inputs with plain Keras (predict on a sub-model per output, reduced in numpy) and print each output's largest absolute and relative error. Exit 1 when one is above its dtype's tolerance.")
    verify.add_argument("output", help="an output directory written by `layerbeam run`")
    verify.add_argument("--sample", type=int, default=32, metavar="N", help="rows to recompute (default 32)")
    verify.add_argument("--seed", type=int, default=0, help="which random rows")
    verify.add_argument("--unsafe-model", action="store_true", help="allow Lambda layers in .keras/.h5 files")
    return p


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("layerbeam")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    # 3, not 2: TensorFlow also logs notices at ERROR level while a job runs ("oneDNN
    # supports DT_UINT8 only on …"); real failures still reach the user as exceptions, and
    # -v (or TF_CPP_MIN_LOG_LEVEL=0) shows everything
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = _parser().parse_known_args(argv)
        _setup_logging(args)
        if args.command == "run":
            return _run(args, rest)
        if rest:
            raise _UsageError(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "show":
            return _show(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "history":
            return _history(args)
        if args.command == "vacuum":
            return _vacuum(args)
        return _layers(args)
    except (_UsageError, LayerbeamError) as e:
        _error(str(e))
        return EXIT_USAGE
    except OutcomeError as e:
        _error(str(e))
        for reason, row in getattr(e, "examples", {}).items():
            print(f"  {reason}: e.g. {row.get('key')!r} in {row.get('shard')}: {str(row.get('detail'))[:200]}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        from .run import is_disk_full

        if not is_disk_full(e):
            raise
        _error(
            f"no space left on the device while writing ({first_line(e)}); nothing was published and finished shards are kept: "
            "free space (or choose another output.path with --set output.path=...) and run the same command again to resume"
        )
        return EXIT_FAILED


def _error(message: str) -> None:
    """Each line of a message as its own `layerbeam: error:` line (config errors come all at once)."""
    for line in message.strip().splitlines() or [""]:
        print(f"layerbeam: error: {line}", file=sys.stderr)


def _setup_logging(args) -> None:
    """layerbeam's lines at INFO (WARNING with -q, DEBUG with -v or --log-level); the
    libraries' own log (TensorFlow, absl, Beam's workers) only with -v."""
    verbose = getattr(args, "verbose", 0)
    level = args.log_level or ("DEBUG" if verbose else "WARNING" if getattr(args, "quiet", False) else "INFO")
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py", "matplotlib", "PIL", "fsspec", "gcsfs", "urllib3", "google"):
        # Beam logs a failing transform's traceback at ERROR before the exception reaches
        # the CLI, which prints it in one line: without -v the libraries stay silent.
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING if verbose else logging.CRITICAL)
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # TensorFlow's own start-up and run lines too


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow and let it probe for GPUs with its C++ start-up lines (the oneDNN
    notice, "could not find cuda drivers", absl's pre-init warning, cuInit's error on a
    machine without GPUs) kept out of the terminal: they go straight to file descriptor 2,
    whatever TF_CPP_MIN_LOG_LEVEL says, and would stand before every one-line error.

    They are replayed if the import fails, and logged at DEBUG level otherwise; when no GPU
    is found, one INFO line says so. TF_CPP_MIN_LOG_LEVEL=0 (show everything) turns the
    capture off, and so does a stderr that cannot be captured (closed).
    """
    show_all = os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"  # main() only sets it when unset
    if show_all or "tensorflow" in sys.modules or sys.stderr is None:
        import tensorflow  # noqa: F401

        return
    import tempfile

    captured = tempfile.TemporaryFile()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 to capture
        captured.close()
        import tensorflow  # noqa: F401, F811

        return
    text = ""
    try:
        os.dup2(captured.fileno(), 2)
        try:
            from .transforms.devices import discover_gpus  # imports TensorFlow

            gpus = discover_gpus()  # the first GPU probe (cuInit) logs too
        finally:
            os.dup2(saved, 2)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
    except BaseException:
        sys.stderr.write(text)
        raise
    finally:
        os.close(saved)
        captured.close()
    log = logging.getLogger("layerbeam")
    log.debug("TensorFlow start-up log:\n%s", text)
    if not gpus:
        log.info("TensorFlow sees no GPU; running on the CPU (TF_CPP_MIN_LOG_LEVEL=0 shows TensorFlow's start-up log)")


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector paused while TensorFlow, Keras and Beam import, and
    what they built frozen after (`gc.freeze`). Their ~750,000 objects live as long as the
    process, but as the heap grows the collector runs full collections that scan all of
    them: 7 of them, 0.7-0.9 s in all, during these imports (counted with `gc.callbacks`,
    2026-11-28), each a pause of the CLI before any work. Frozen, they are never scanned
    again. The imports' own cyclic garbage is frozen with them: about 5,000 objects, which
    one full collection (0.5 s) would have freed.

    The CLI owns its process; the library never touches the collector. Only a fresh process
    is paused and frozen: where any of them is imported already (`main` called in a process
    that has done other work), its garbage would be frozen with them."""
    if any(m in sys.modules for m in ("tensorflow", "keras", "apache_beam")):
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _console():
    """stdout's console. On a terminal, its width (at least 120); otherwise (a pipe, a
    file) wide enough that no table cell or line is ever wrapped, so `| grep` finds every
    path whole."""
    import shutil

    from rich.console import Console

    if sys.stdout.isatty():
        return Console(highlight=False, width=max(120, shutil.get_terminal_size((120, 40)).columns))
    return Console(highlight=False, width=100_000, soft_wrap=True, no_color=True)


def _run(args, beam_args: list[str]) -> int:
    from .config import load_config
    from .plan import human, prepare
    from .run import run_job

    if beam_args:
        stray = _stray_arguments(beam_args)
        if stray:
            raise _UsageError(f"unexpected argument {stray!r}; flags for Beam start with --, config overrides use --set key=value")
        _check_beam_flags(beam_args)
    overrides = list(args.overrides)
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.unsafe_model:
        overrides.append("model.safe_mode=false")
    if args.max_shards is not None:
        overrides.append(f"input.max_shards={args.max_shards}")
    if args.max_examples_per_shard is not None:
        overrides.append(f"input.max_examples_per_shard={args.max_examples_per_shard}")
    if args.max_dead_letter_fraction is not None:
        overrides.append(f"output.max_dead_letter_fraction={args.max_dead_letter_fraction}")
    cfg = load_config(args.config, overrides)
    with _collector_paused():
        _import_tensorflow_quietly()
        import apache_beam  # noqa: F401 - run_job's and prepare's, imported here with the collector paused
        import keras  # noqa: F401
    from .plan import OverCapError

    console = _console()
    try:
        plan = prepare(cfg, plan_only=args.plan_only)
    except OverCapError as e:
        _print_plan(console, e.plan, human)  # show what is too big before refusing (even with -q: it is the reason)
        if args.plan_only:  # a plan never refuses: it says what a run would refuse
            console.print(f"a run would refuse: {e}", markup=False)
            return 0
        raise
    if args.plan_only or not args.quiet:  # with --plan-only the plan is the summary
        _print_plan(console, plan, human)
    if args.plan_only:
        if plan.output_problem:
            console.print(f"a run would refuse: {plan.output_problem}", markup=False)
        return 0
    if plan.up_to_date:  # nothing new, changed or removed: nothing written, success
        run_job(cfg, beam_args, plan)  # only finishes a committed run's cleanup, if a kill left one
        print(f"up to date at version {plan.parent}")
        return 0
    with _progress_display(enabled=not args.quiet and sys.stderr.isatty()) as progress:
        manifest = run_job(cfg, beam_args, plan, progress=progress)
    if manifest.get("_up_to_date"):  # `images`: the pipeline's listing found nothing new, changed or removed
        print(f"up to date at version {plan.parent}")
        return 0
    if manifest.get("_dry_run") or manifest.get("_template"):  # --dry_run=True / --template_location: the job graph, nothing submitted
        print(json.dumps(manifest, indent=1))
        return 0
    _print_summary(console, manifest, human, quiet=args.quiet)
    return 0


def _check_beam_flags(beam_args: list[str]) -> None:
    """Refuse a `--flag` that neither layerbeam nor Beam knows (a typo such as --runer would
    otherwise only warn, and the job would run with the default), naming the closest one;
    and an unknown `--runner`."""
    import difflib

    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    parsers = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append, display_warnings=False)
    parser = parsers[0]
    known = sorted(o for o in parser._option_string_actions if o.startswith("--"))
    _, unknown = parser.parse_known_args(beam_args)
    for a in unknown:
        if a == "--":
            break
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            close = difflib.get_close_matches(name, known + ["--set", "--overwrite", "--plan-only", "--max-shards", "--max-examples-per-shard", "--max-dead-letter-fraction"], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise _UsageError(f"unknown flag {name!r}: neither layerbeam nor Beam knows it; {hint}see `layerbeam run --help` and Beam's pipeline options")
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    if runner is not None:
        from apache_beam.runners.runner import create_runner

        try:
            create_runner(runner)
        except ValueError as e:
            raise _UsageError(f"--runner={runner} is not a Beam runner ({first_line(e)})") from None
        except ImportError as e:
            raise _UsageError(f"--runner={runner} needs packages that are not installed ({first_line(e)}); for Dataflow: pip install 'layerbeam[gcp]'") from None


class _progress_display:
    """A live progress line on the terminal (stderr) while a local job runs: shards and
    examples done of the planned totals, examples/s, ETA, dead letters so far. Remote
    runners get one line with the job id and state. Off when `enabled` is false (not a
    terminal, or -q): then it hands `run_job` no callback at all."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]extracting"), BarColumn(), TextColumn("{task.fields[what]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        # Log lines (one per shard) go through the display's console, above the live line,
        # instead of tearing it.
        from rich.logging import RichHandler

        root = logging.getLogger()
        self.saved = root.handlers[:]
        handler = RichHandler(console=self.bar.console, show_path=False, show_level=False, log_time_format="%H:%M:%S")
        handler.setLevel(min((h.level for h in self.saved), default=logging.INFO))
        root.handlers = [handler]
        return self.update

    def update(self, p) -> None:
        if "job_id" in p:
            self.bar.console.print(f"submitted job {p['job_id']} · state {p['state']}", markup=False)
            return
        if self.task is None:
            self.bar.start()
            total = p["examples"] or p["shards"]
            self.task = self.bar.add_task("extract", total=total, what="")
        secs = max(p["seconds"], 1e-9)
        by_examples = bool(p["examples"])
        done = p["examples_done"] if by_examples else p["shards_done"]
        total = p["examples"] if by_examples else p["shards"]
        ex_total = f"/~{p['examples']:,}" if p["examples"] else ""
        what = (f"shards {p['shards_done']}/{p['shards']} · examples {p['examples_done']:,}{ex_total} · "
                f"{p['examples_done'] / secs:,.1f} examples/s · dead letters {p['dead_letters']:,}")
        self.bar.update(self.task, completed=min(done, total) if total else done, total=max(total or 0, done), what=what)

    def __exit__(self, *exc):
        if self.bar is not None:
            logging.getLogger().handlers = self.saved
            if self.task is not None:
                self.bar.stop()
        return False


def _stray_arguments(beam_args: list[str]) -> str | None:
    """The first word Beam's own option parser would not take as a flag or a flag's value
    (`--runner DataflowRunner` is fine; `--save_main_session extra.yaml` is not), or None.
    An unknown `--flag` may take the word after it, as Beam itself allows."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parsers = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append, display_warnings=False)
    _, unknown = parsers[0].parse_known_args(beam_args)
    for i, a in enumerate(unknown):
        if a == "--":
            return None
        if not a.startswith("-") and not (i and unknown[i - 1].startswith("--") and "=" not in unknown[i - 1]):
            return a
    return None


def _print_plan(console, plan, human) -> None:
    from rich.table import Table

    t = Table(title=f"size plan · run {plan.run_id}", title_justify="left")
    for col in ("output", "source", "reduce", "shape", "dtype", "bytes/example"):
        t.add_column(col, justify="right" if col == "bytes/example" else "left")
    for s in plan.outputs:
        t.add_row(s.name, s.path if s.path != s.name else "", s.reduce, "×".join(map(str, s.shape)) or "scalar", s.dtype, human(plan.stored_bytes(s)))
    console.print(t)
    for name, how in getattr(plan, "reading", ()):
        console.print(f"input {name}: {how}", markup=False)
    est = plan.estimated_examples
    proj = plan.projected_bytes
    listing = getattr(plan, "listing", None)
    # `images` listed in the pipeline: the launcher's figures come from a sample of folders
    approx = "~" if listing and not listing["exact"] else ""
    sampled = f" (from {listing['prefixes_listed']:,} of {listing['prefixes']:,} folders listed)" if approx else ""
    console.print(
        f"total: {len(plan.outputs)} outputs · {human(plan.bytes_per_example)} per example · {approx}{plan.shards:,} shards, {approx}{human(plan.input_bytes)} in{sampled}"
        + (f" · ~{est:,} examples → ~{human(proj)} out (before compression)" if est is not None else " · dataset size unknown")
        + f" · cap {human(plan.config['layers']['max_bytes_per_example'])} per example (layers.max_bytes_per_example)",
        markup=False,
    )
    d = plan.delta
    if d is not None:
        if plan.up_to_date:
            console.print(f"versions: nothing new, changed or removed since version {plan.parent}: up to date", markup=False)
        elif d.get("rebuild") and plan.config["output"]["overwrite"]:
            console.print(f"versions: --overwrite: all {plan.shards} shards extracted as a new lineage (version {plan.parent + 1}; version {plan.parent} stays readable)", markup=False)
        elif d.get("in_pipeline"):  # images: listed in the pipeline, matched there
            console.print(f"versions: version {plan.parent + 1} from version {plan.parent}, or up to date: images: new, changed and reused shards decided while listing, in the pipeline", markup=False)
        else:
            console.print(
                f"versions: version {plan.parent + 1} from version {plan.parent}: {d['new']} new, {d['changed']} changed, {d['reused']} reused, {d['removed']} removed shards"
                + (f", {d['redone']} extracted again (they had lost keys to a shard that changed or left)" if d.get("redone") else "")
                + f" · {plan.to_extract} to extract",
                markup=False,
            )
    lost = plan.unreadable_by
    if lost:
        console.print(
            f"readers: output.parquet_encoding={plan.parquet_encoding} cannot be read by "
            + "; ".join(f"{r} ({why})" for r, why in lost.items())
            + "; the default 'portable' reads everywhere",
            markup=False,
        )


def _loads_note(metrics: dict) -> str:
    loads = metrics.get("model_loads")
    if not loads:
        return ""
    how = "the launcher's, reused in-process" if metrics.get("launcher_model_reused") else "once per worker process"
    return f" · model loaded {loads}× ({how})"


def _print_summary(console, manifest: dict, human, quiet: bool = False) -> None:
    from .transforms.versions import files_of

    c = manifest["counts"]
    out = manifest["config"]["output"]["path"]
    files = files_of(manifest, out)
    secs = manifest.get("_seconds", 0.0)
    nbytes = sum(f["bytes"] for f in files)
    rate = c["records_read"] / secs if secs else 0.0
    errs = manifest.get("shard_errors") or []
    bad = {n: (s.get("nan", 0), s.get("inf", 0)) for n, s in (manifest.get("statistics") or {}).items() if s.get("nan") or s.get("inf")}
    # an incremental version: what it took from its parent (for `images` decided in the pipeline)
    d = manifest.get("delta") or {}
    delta = (
        f" · version {manifest['version']} from {manifest['parent']}: {d['new']} new, {d['changed']} changed, {d['reused']} reused, {d['removed']} removed shards"
        + (f", {d['redone']} extracted again" if d.get("redone") else "") + (" (rebuilt)" if d.get("rebuild") else "")
        if manifest.get("parent") is not None and "new" in d else ""
    )
    console.print(
        f"done · {c['rows_written']:,} rows, {c['dead_letters']:,} dead letters, {len(errs)} shard errors, from {c['records_read']:,} records "
        f"· {len(files)} files, {human(nbytes)} · {secs:.1f}s ({rate:.1f} examples/s)"
        + (" · SAMPLE (smoke run)" if manifest.get("sample") else "")
        + _loads_note(manifest.get("_metrics", {})) + delta,
        markup=False,
    )
    reasons = c.get("dead_letter_reasons") or {}
    if reasons:
        console.print("dead letters by reason: " + ", ".join(f"{r} {n:,}" for r, n in sorted(reasons.items())) + " (in _dead_letters/)", markup=False)
    for name, (nan, inf) in bad.items():
        console.print(f"warning: output {name!r} holds {nan:,} NaN and {inf:,} Inf values; check the model and its preprocessing (`layerbeam show` has the statistics)", markup=False)
    for e in errs[:3]:
        console.print(f"shard error in {e.get('path')}: {e.get('reason')}: {str(e.get('detail'))[:200]} ({e.get('records_kept', 0):,} records kept)", markup=False)
    if quiet:
        return
    console.print(f"output: {out}", markup=False)
    console.print("read it (Parquet or TFRecord alike; `layerbeam show` summarizes it, `layerbeam verify` checks it):")
    console.print(
        "  import layerbeam\n"
        f"  table = layerbeam.read({out!r})   # or layerbeam.to_pandas(...), layerbeam.to_tf_dataset(...)",
        markup=False,
    )


def _show(args) -> int:
    from rich.table import Table

    from .plan import human
    from .transforms.readback import head, open_output

    out = open_output(args.output, args.at_version)
    if out.format == "tfrecord" and args.rows > 0:
        _import_tensorflow_quietly()  # reading TFRecord rows imports TensorFlow: its start-up lines stay out
    m = out.manifest
    st = out.storage
    console = _console()
    from .transforms.versions import files_of, load_version

    files = m["files"] if "files" in m else files_of(m, out.path, load_version(out.path, None)[0])
    nbytes = sum(f["bytes"] for f in files)
    fmt = st["format"] + (f" ({st['encoding']})" if st.get("encoding") else " (compat: plain list<float32>)" if st.get("compat") else "") + (f", {st['compression']}" if st.get("compression") else "")
    model = m["model"]
    console.print(f"[bold]{out.path}[/bold] · version {out.version} · {fmt} · created {m.get('created', '?')} · run {m.get('run_id', '?')}", highlight=False)
    console.print(f"model: {model['source']} (weights: {model.get('weights')}) · fingerprint {model['fingerprint'][:12]} · inputs {model.get('input_shapes')}", markup=False)
    if m.get("sample"):
        inp = m["config"]["input"]
        console.print(
            f"SAMPLE: a smoke run, not the whole input ({m.get('shards_planned', '?')} of {m.get('shards_total', '?')} shards"
            + (f", at most {inp['max_examples_per_shard']} examples per shard" if inp.get("max_examples_per_shard") else "") + ")",
            markup=False,
        )
    t = Table(title="outputs", title_justify="left")
    for col in ("output", "source", "reduce", "shape", "dtype", "stored as", "bytes/example"):
        t.add_column(col, justify="right" if col == "bytes/example" else "left")
    stored = {c["name"]: c for c in out.columns}
    for o in m["outputs"]:
        c = stored[o["name"]]
        how = f"{c['dtype']} {c['tfrecord']['kind']}" if "tfrecord" in c else c["parquet"]["type"].replace("fixed_shape_tensor", "tensor")
        t.add_row(o["name"], o["path"] if o["path"] != o["name"] else "", o["reduce"], "×".join(map(str, o["shape"])) or "scalar", o["dtype"], how, human(o["bytes_per_example"]))
    console.print(t)
    c = m["counts"]
    parts: dict[str, list[int]] = {}
    for f in files:
        d = posixpath.dirname(f["path"]) or "."
        parts.setdefault(d, [0, 0, 0])
        parts[d][0] += f["rows"]
        parts[d][1] += 1
        parts[d][2] += f["bytes"]
    console.print(
        f"rows: {c['rows_written']:,} · dead letters: {c['dead_letters']:,} · files: {len(files)} · bytes: {human(nbytes)}"
        + (f" · partitioned by {', '.join(st['partition_by'])}" if st["partition_by"] else ""),
        highlight=False,
    )
    if st["partition_by"]:
        pt = Table(title="partitions", title_justify="left")
        for col in ("partition", "rows", "files", "bytes"):
            pt.add_column(col, justify="left" if col == "partition" else "right")
        for d, (r, n, b) in sorted(parts.items()):
            pt.add_row(d, f"{r:,}", str(n), human(b))
        console.print(pt)
    stats = m.get("statistics") or {}
    if stats:
        stt = Table(title="statistics (every value of every row)", title_justify="left")
        for col in ("output", "values", "mean", "std", "min", "max", "zeros", "NaN", "Inf"):
            stt.add_column(col, justify="left" if col == "output" else "right")
        for name, v in stats.items():
            g = (lambda x: "-" if x is None else f"{x:.4g}")
            stt.add_row(name, f"{v['count']:,}", g(v["mean"]), g(v["std"]), g(v["min"]), g(v["max"]),
                        "-" if v["zero_fraction"] is None else f"{v['zero_fraction']:.1%}", f"{v['nan']:,}", f"{v['inf']:,}")
        console.print(stt)
    if args.plot:
        _plot(out, args.plot, console)
    if args.rows <= 0 or c["rows_written"] == 0:
        return 0
    import numpy as np

    table = head(out, args.rows)
    scalars = [c["name"] for c in out.columns if c["role"] != "output"]
    tensors = [c["name"] for c in out.columns if c["role"] == "output"]
    rows = Table(title=f"first {len(table)} rows", title_justify="left")
    for col in ("key", "columns", "output", "min", "mean", "max", "std", "zeros"):
        rows.add_column(col, justify="right" if col in ("min", "mean", "max", "std", "zeros") else "left", no_wrap=col in ("key", "output"), overflow="fold")
    arrays = {n: table.column(n).combine_chunks().to_numpy_ndarray().astype(np.float64) for n in tensors}
    for i in range(len(table)):
        key = str(table.column("key")[i].as_py()) if "key" in scalars else str(i)
        others = "\n".join(f"{n}={table.column(n)[i].as_py()}" for n in scalars if n != "key")
        for j, n in enumerate(tensors):
            v = arrays[n][i]
            rows.add_row(key if j == 0 else "", others if j == 0 else "", n, f"{v.min():.3g}", f"{v.mean():.3g}", f"{v.max():.3g}", f"{v.std():.3g}", f"{(v == 0).mean():.0%}",
                         end_section=j == len(tensors) - 1)
    console.print(rows)
    return 0


def _history(args) -> int:
    from .transforms.errors import OutputError
    from .transforms.versions import list_versions, manifest_version

    versions = list_versions(args.output)
    if not versions:
        raise OutputError(f"{args.output!r} is not a complete layerbeam output (no _SUCCESS); nothing to list")
    print(f"{'version':>7}  {'created':<25}  {'parent':>6}  {'lineage':>7}  {'new':>5}  {'changed':>7}  {'reused':>6}  {'removed':>7}  {'rows':>12}  {'files':>6}")
    for m in versions:
        d = m.get("delta") or {}
        n = len(m["inputs"]) if "inputs" in m else m.get("files_count", 0)
        print(
            f"{manifest_version(m):>7}  {m.get('created', '?'):<25}  {m.get('parent') if m.get('parent') is not None else '-':>6}  {m.get('lineage', manifest_version(m)):>7}  "
            f"{d.get('new', n) + d.get('redone', 0):>5}  {d.get('changed', 0):>7}  {d.get('reused', 0):>6}  {d.get('removed', 0):>7}  {m['counts']['rows_written']:>12,}  {len(m['files']) if 'files' in m else m.get('files_count', 0):>6}"
        )
    return 0


def _vacuum(args) -> int:
    from .plan import human
    from .transforms.versions import vacuum

    r = vacuum(args.output, args.keep)
    print(
        f"kept versions {r['kept']}; removed versions {r['removed_versions'] or 'none'}: "
        f"{r['files']} files, {human(r['bytes'])} freed from {args.output.rstrip('/')}.layerbeam-history"
    )
    return 0


def _plot(out, path: str, console) -> None:
    """One panel per output: a histogram of its values (all rows, read back) with the
    manifest's statistics written beside it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _UsageError("--plot needs matplotlib, which is not installed; pip install 'layerbeam[plot]'") from None
    import numpy as np

    from .transforms.readback import to_arrow
    from .transforms.stats import values_of

    names = [c["name"] for c in out.columns if c["role"] == "output"]
    stats = out.manifest.get("statistics") or {}
    table = to_arrow(out, names)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.remove()
    for ax, name in zip(axes.flat, names):
        v = values_of(table.column(name)).astype(np.float64)
        finite = v[np.isfinite(v)]
        ax.hist(finite, bins=60, color="#3b6ea5")
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
        st = stats.get(name)
        if st and st["mean"] is not None:
            ax.text(0.98, 0.95, f"n={st['count']:,}\nmean {st['mean']:.3g}\nstd {st['std']:.3g}\nmin {st['min']:.3g}\nmax {st['max']:.3g}\n"
                    f"zeros {st['zero_fraction']:.1%}\nNaN {st['nan']} Inf {st['inf']}",
                    transform=ax.transAxes, ha="right", va="top", fontsize=7, family="monospace")
    fig.suptitle(f"{out.path} · {len(table):,} rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    console.print(f"plot: {path} ({len(names)} panels)", markup=False)


def _verify(args) -> int:
    """`layerbeam verify OUTPUT`: see `layerbeam.verify`."""
    _import_tensorflow_quietly()
    from rich.table import Table

    from .verify import verify

    report = verify(args.output, sample=args.sample, seed=args.seed, safe_mode=not args.unsafe_model)
    console = _console()
    t = Table(title=f"verify · {report.rows} random rows recomputed with plain Keras", title_justify="left")
    for col in ("output", "dtype", "max abs error", "max rel error", "tolerance", "ok"):
        t.add_column(col, justify="left" if col in ("output", "dtype", "ok") else "right")
    for r in report.outputs:
        t.add_row(r.name, r.dtype, f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", f"{r.tolerance:.3g}", "ok" if r.ok else "FAIL")
    console.print(t)
    if report.ok:
        console.print(f"ok: every output within its dtype's tolerance on {report.rows} rows", markup=False)
        return 0
    bad = [r for r in report.outputs if not r.ok]
    _error(f"{len(bad)} output(s) differ from plain Keras beyond tolerance: " + ", ".join(f"{r.name} (max abs error {r.max_abs:.3g} at key {r.worst_key!r})" for r in bad))
    return EXIT_FAILED


def _layers(args) -> int:
    """`layerbeam layers MODEL`: every tappable path, or what `--match` selectors pick."""
    _import_tensorflow_quietly()
    from .transforms.layers import ModelGraph
    from .transforms.models import ModelSpec, load_model

    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(x) for x in args.input_shape.replace("x", ",").split(","))
        except ValueError:
            raise _UsageError(f"--input-shape {args.input_shape!r} is not a shape; write it like 224,224,3") from None
    is_app = args.model.startswith("keras.applications.")
    mcfg = ModelSpec(source=args.model, weights=args.weights, input_shape=shape if is_app else None, safe_mode=not args.unsafe_model)
    try:
        model = load_model(mcfg)
        graph = ModelGraph(model, input_shapes=[shape] if shape and not is_app else None)
        rows = graph.describe(reduce=args.reduce, dtype=args.dtype)
        if args.match:
            keep = {t.path for sel in args.match for t in graph.match(sel, args.include_inputs, what="--match selector")}
            rows = [r for r in rows if r["path"] in keep]
    except LayerbeamError as e:
        raise type(e)(str(e).replace("{model}", args.model)) from None
    if args.json:
        doc = {
            "model": args.model,
            "inputs": {k: list(v) for k, v in graph.input_shapes.items()},
            "reduce": args.reduce,
            "dtype": args.dtype,
            "match": args.match,
            "tensors": rows,
        }
        print(json.dumps(doc, indent=1))
        return 0
    from rich.table import Table

    from .plan import human

    t = Table(title=f"{args.model} · inputs {graph.input_shapes}", title_justify="left")
    for col in ("path", "type", "output shape", "dtype", f"bytes/example ({args.reduce}, {args.dtype})", "params"):
        t.add_column(col, justify="right" if col.startswith(("bytes", "params")) else "left", overflow="fold")
    for r in rows:
        kind = r["type"] + (" (model)" if r["is_model"] else " (opaque)" if r["opaque"] else "")
        nbytes = "?" if r["bytes_per_example"] is None else human(r["bytes_per_example"])
        shape_text = "×".join("?" if d is None else str(d) for d in r["shape"]) or "scalar"
        t.add_row("  " * r["depth"] + r["path"], kind, shape_text, r["dtype"], nbytes, f"{r['params']:,}")
    console = _console()
    console.print(t)
    total = sum(r["bytes_per_example"] or 0 for r in rows if not r["is_model"] and not r["is_input"])
    what = f"matched by {', '.join(args.match)}" if args.match else "in the model"
    console.print(
        f"{len(rows)} tensors {what}; layers (not inputs or nested-model outputs) take {human(total)} per example "
        f"stored as {args.reduce}/{args.dtype}. Select them in a config under layers.select "
        "(exact path, glob, re:…, type:…, all); see README, 'Choosing outputs'",
        markup=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
