"""The `layerbeam` command line.

    layerbeam run CONFIG [--set a.b=c ...] [--overwrite] [--unsafe-model] [BEAM FLAGS ...]
    layerbeam layers MODEL [--input-shape 224,224,3] [--match SELECTOR] [--reduce mean] [--json]
    layerbeam show OUTPUT [--rows 5]

User errors print one line (`layerbeam: error: …`) and exit with code 2; Beam's own flags
(`--runner`, `--direct_num_workers`, `--project` …) pass through untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys
from collections.abc import Sequence

from .transforms.errors import LayerbeamError

__all__ = ["main"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as everywhere else
        raise _UsageError(f"{message}; see `{self.prog} --help`")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="layerbeam", description="Write Keras layer outputs for every example of a sharded dataset to Parquet or TFRecord.")
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
    layers.add_argument("--match", action="append", default=[], metavar="SELECTOR", help="show only what a selector matches, as layers.select would (exact path, glob, re:…, type:…, all; repeatable)")
    layers.add_argument("--include-inputs", action="store_true", help="let patterns match model inputs, as layers.include_inputs: true does")
    layers.add_argument("--reduce", default="none", choices=["none", "mean", "max", "flatten"], help="reduction used for the bytes column")
    layers.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="stored dtype used for the bytes column")
    layers.add_argument("--weights", default=None, help="keras.applications weights (default: none, random)")
    layers.add_argument("--unsafe-model", action="store_true", help="allow Lambda layers in .keras/.h5 files")
    layers.add_argument("--json", action="store_true", help="print one JSON document for scripts: {model, inputs, reduce, dtype, tensors: [...]}")

    show = sub.add_parser("show", help="summarize a finished output: model, outputs, partitions, files, first rows", description="Print an output's manifest summary and its first rows' keys and value statistics (Parquet or TFRecord).")
    show.add_argument("output", help="an output directory written by `layerbeam run` (local or fsspec URL)")
    show.add_argument("--rows", type=int, default=5, help="how many rows to show (default 5; 0 for none)")
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
        if args.command == "show":
            return _show(args)
        return _layers(args)
    except _UsageError as e:
        print(f"layerbeam: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LayerbeamError as e:
        print(f"layerbeam: error: {e}", file=sys.stderr)
        return EXIT_USAGE


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


def _console():
    from rich.console import Console

    import shutil

    return Console(stderr=False, highlight=False, width=max(120, shutil.get_terminal_size((120, 40)).columns))


def _run(args, beam_args: list[str]) -> int:
    from .plan import human, prepare
    from .run import run_job
    from .config import load_config

    stray = _stray_arguments(beam_args) if beam_args else None
    if stray:
        raise _UsageError(f"unexpected argument {stray!r}; flags for Beam start with --, config overrides use --set key=value")
    overrides = list(args.overrides)
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.unsafe_model:
        overrides.append("model.safe_mode=false")
    if args.max_shards is not None:
        overrides.append(f"input.max_shards={args.max_shards}")
    if args.max_examples_per_shard is not None:
        overrides.append(f"input.max_examples_per_shard={args.max_examples_per_shard}")
    cfg = load_config(args.config, overrides)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _import_tensorflow_quietly()
    from .plan import OverCapError

    console = _console()
    try:
        plan = prepare(cfg)
    except OverCapError as e:
        _print_plan(console, e.plan, human)  # show what is too big before refusing
        raise
    _print_plan(console, plan, human)
    if args.plan_only:
        return 0
    manifest = run_job(cfg, beam_args, plan)
    if manifest.get("_dry_run"):  # --dry_run=True: the runner built the job graph, submitted nothing
        print(json.dumps(manifest, indent=1))
        return 0
    _print_summary(console, manifest, human)
    return 0


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
    est = plan.estimated_examples
    proj = plan.projected_bytes
    console.print(
        f"total: {len(plan.outputs)} outputs · {human(plan.bytes_per_example)} per example · {plan.shards} shards, {human(plan.input_bytes)} in"
        + (f" · ~{est:,} examples → ~{human(proj)} out (before compression)" if est is not None else " · dataset size unknown")
        + f" · cap {human(plan.config['layers']['max_bytes_per_example'])} per example (layers.max_bytes_per_example)",
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
        + _loads_note(manifest.get("_metrics", {}))
    )
    console.print(f"output: {out}")
    console.print("read it (Parquet or TFRecord alike; `layerbeam show` summarizes it):")
    console.print(
        "  import layerbeam\n"
        f"  table = layerbeam.read({out!r})   # or layerbeam.to_pandas(...), layerbeam.to_tf_dataset(...)",
        markup=False,
    )


def _show(args) -> int:
    from rich.table import Table

    from .plan import human
    from .transforms.readback import head, open_output

    out = open_output(args.output)
    m = out.manifest
    st = out.storage
    console = _console()
    files = m["files"]
    nbytes = sum(f["bytes"] for f in files)
    fmt = st["format"] + (f" ({st['encoding']})" if st.get("encoding") else " (compat: plain list<float32>)" if st.get("compat") else "") + (f", {st['compression']}" if st.get("compression") else "")
    model = m["model"]
    console.print(f"[bold]{out.path}[/bold] · {fmt} · created {m.get('created', '?')} · run {m.get('run_id', '?')}", highlight=False)
    console.print(f"model: {model['source']} (weights: {model.get('weights')}) · fingerprint {model['fingerprint'][:12]} · inputs {model.get('input_shapes')}", markup=False)
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
    if args.rows <= 0:
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
