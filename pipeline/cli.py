"""The `layerbeam` command line.

    layerbeam run CONFIG [--set a.b=c ...] [--overwrite] [--unsafe-model] [BEAM FLAGS ...]
    layerbeam layers MODEL [--input-shape 224,224,3] [--match SELECTOR] [--reduce mean] [--json]

User errors print one line (`layerbeam: error: …`) and exit with code 2; Beam's own flags
(`--runner`, `--direct_num_workers`, `--project` …) pass through untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from transforms.errors import LayerbeamError

__all__ = ["main"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as everywhere else
        raise _UsageError(f"{message}; see `{self.prog} --help`")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layerbeam", description="Write Keras layer outputs for every example of a sharded dataset to Parquet.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a job from a YAML config", description="Run a job. Unknown flags go to Beam (e.g. --runner=DataflowRunner).")
    run.add_argument("config", help="YAML config file (see configs/demo.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. --set output.path=/tmp/out (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing complete output")
    run.add_argument("--unsafe-model", action="store_true", help="load .keras/.h5 files with Python code (Lambda layers); only for files you trust")
    run.add_argument("--max-shards", type=int, help="smoke run: only the first N shards")
    run.add_argument("--max-examples-per-shard", type=int, help="smoke run: at most N records per shard")
    run.add_argument("--plan-only", action="store_true", help="print the size plan and stop")
    run.add_argument("-q", "--quiet", action="store_true", help="print only the summary")

    layers = sub.add_parser("layers", help="list every tappable layer output of a model", description="List every tappable tensor: path, type, shape, bytes per example, parameters.")
    layers.add_argument("model", help="keras.applications.<Name>, a .keras/.h5 file, or module:function")
    layers.add_argument("--input-shape", help="input shape without batch, e.g. 224,224,3 (default: the model's)")
    layers.add_argument("--match", action="append", default=[], metavar="SELECTOR", help="show only what a selector matches (glob, re:…, type:…, all)")
    layers.add_argument("--reduce", default="none", choices=["none", "mean", "max", "flatten"], help="reduction used for the bytes column")
    layers.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="stored dtype used for the bytes column")
    layers.add_argument("--weights", default=None, help="keras.applications weights (default: none, random)")
    layers.add_argument("--unsafe-model", action="store_true", help="allow Lambda layers in .keras/.h5 files")
    layers.add_argument("--json", action="store_true", help="print JSON lines for scripts")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = _parser().parse_known_args(argv)
        if args.command == "run":
            return _run(args, rest)
        if rest:
            raise _UsageError(f"unrecognized arguments: {' '.join(rest)}")
        return _layers(args)
    except _UsageError as e:
        print(f"layerbeam: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LayerbeamError as e:
        print(f"layerbeam: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _console():
    from rich.console import Console

    import shutil

    return Console(stderr=False, highlight=False, width=max(120, shutil.get_terminal_size((120, 40)).columns))


def _run(args, beam_args: list[str]) -> int:
    from pipeline.build import _human, prepare, run_job
    from pipeline.config import load_config

    bad = [a for a in beam_args if not a.startswith("-")]
    if bad:
        raise _UsageError(f"unexpected argument {bad[0]!r}; flags for Beam start with --, config overrides use --set key=value")
    overrides = list(args.overrides)
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.unsafe_model:
        overrides.append("model.safe_mode=false")
    if args.max_shards:
        overrides.append(f"input.max_shards={args.max_shards}")
    if args.max_examples_per_shard:
        overrides.append(f"input.max_examples_per_shard={args.max_examples_per_shard}")
    cfg = load_config(args.config, overrides)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    console = _console()
    plan = prepare(cfg)
    _print_plan(console, plan, _human)
    if args.plan_only:
        return 0
    manifest = run_job(cfg, beam_args, plan)
    _print_summary(console, manifest, _human)
    return 0


def _print_plan(console, plan, human) -> None:
    from rich.table import Table

    t = Table(title=f"size plan · run {plan.run_id}", title_justify="left")
    for col in ("output", "source", "reduce", "shape", "dtype", "bytes/example"):
        t.add_column(col, justify="right" if col == "bytes/example" else "left")
    for s in plan.outputs:
        t.add_row(s.name, s.path if s.path != s.name else "", s.reduce, "×".join(map(str, s.shape)) or "scalar", s.dtype, human(s.bytes_per_example))
    console.print(t)
    est = plan.estimated_examples
    proj = plan.projected_bytes
    console.print(
        f"{len(plan.outputs)} outputs · {human(plan.bytes_per_example)} per example · {plan.shards} shards, {human(plan.input_bytes)} in"
        + (f" · ~{est:,} examples → ~{human(proj)} out (before compression)" if est is not None else "")
    )


def _print_summary(console, manifest: dict, human) -> None:
    c = manifest["counts"]
    files = manifest["files"]
    out = manifest["config"]["output"]["path"]
    secs = manifest.get("_seconds", 0.0)
    nbytes = sum(f["bytes"] for f in files)
    rate = c["records_read"] / secs if secs else 0.0
    console.print(
        f"[bold]done[/bold] · {c['rows_written']:,} rows, {c['dead_letters']:,} dead letters, from {c['records_read']:,} records "
        f"· {len(files)} files, {human(nbytes)} · {secs:.1f}s ({rate:.1f} examples/s)"
    )
    console.print(f"output: {out}")
    console.print("read it:")
    console.print(
        "  import pyarrow.dataset as ds\n"
        f"  table = ds.dataset({out!r}, format='parquet', partitioning='hive').to_table()\n"
        f"  print(table.num_rows, table.column_names)",
        markup=False,
    )


def _layers(args) -> int:
    from pipeline.config import ModelConfig
    from transforms.extractor import ModelGraph, load_model, _matches

    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(x) for x in args.input_shape.replace("x", ",").split(","))
        except ValueError:
            raise _UsageError(f"--input-shape {args.input_shape!r} is not a shape; write it like 224,224,3") from None
    mcfg = ModelConfig(source=args.model, weights=args.weights, input_shape=shape, safe_mode=not args.unsafe_model)
    model = load_model(mcfg)
    graph = ModelGraph(model, input_shapes=[shape] if shape and not args.model.startswith("keras.applications.") else None)
    rows = graph.describe(reduce=args.reduce, dtype=args.dtype)
    if args.match:
        from transforms.extractor import SelectionError

        keep = set()
        for sel in args.match:
            hits = {t.path for t in graph.traced if _matches(sel, t, True if sel != "all" else False)}
            if not hits:
                raise SelectionError(graph._no_match_message("selector", sel).replace("{model}", args.model))
            keep |= hits
        rows = [r for r in rows if r["path"] in keep]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    from pipeline.build import _human
    from rich.table import Table

    t = Table(title=f"{args.model} · inputs {graph.input_shapes}", title_justify="left")
    for col in ("path", "type", "output shape", "dtype", f"bytes/example ({args.reduce}, {args.dtype})", "params"):
        t.add_column(col, justify="right" if col.startswith(("bytes", "params")) else "left")
    for r in rows:
        t.add_row("  " * r["depth"] + r["path"], r["type"], "×".join(map(str, r["shape"])), r["dtype"], _human(r["bytes_per_example"]), f"{r['params']:,}")
    console = _console()
    console.print(t)
    console.print(f"{len(rows)} tensors; select them in a config under layers.select (exact path, glob, re:…, type:…, all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
