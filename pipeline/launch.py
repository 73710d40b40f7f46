"""`python -m layerbeam.launch`: `layerbeam run` driven by `--name=value` flags alone.

Schedulers that start Beam jobs pass nothing but flags after the program: Airflow's
BeamRunPythonPipelineOperator turns its `pipeline_options` into `--key=value` (a list into
one flag per item, True into a bare `--key`), and a Dataflow Flex Template's launcher turns
each template parameter into `--name=value`. This front end takes the config and the usual
overrides as such flags, builds the `layerbeam run` command line and runs it: same checks,
same output, same exit codes. Every other flag goes to Beam, as `layerbeam run` passes them.

    python -m layerbeam.launch --config=CONFIG [--input_pattern=GLOB] [--output_path=URL]
        [--set=KEY=VALUE ...] [--overrides='KEY=VALUE;KEY=VALUE'] [--overwrite[=true]]
        [--plan_only] [--max_shards=N] [--max_examples_per_shard=N]
        [--max_dead_letter_fraction=F] [BEAM FLAGS ...]

`--config` is a local file or any fsspec URL (gs://, s3://): a scheduled job's config can
live beside its data instead of in the image or on the scheduler's machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["main", "run_command_line"]

# Beam's Dataflow client logs "Created job with id: [ID]" at INFO; Airflow's Dataflow hook
# finds the job by that line (to follow, link and cancel it), so it must reach stderr
# even though `layerbeam run` silences Beam's own log without -v.
_JOB_ID_LOGGER = "apache_beam.runners.dataflow.internal.apiclient"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as `layerbeam` itself
        print(f"layerbeam: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m layerbeam.launch",
        description="`layerbeam run` with every argument a --name=value flag (Airflow's Beam operator, Dataflow Flex Templates). Unknown flags go to Beam.",
        allow_abbrev=False,
    )
    p.add_argument("--config", required=True, help="YAML config: a local path or an fsspec URL (gs://…/job.yaml)")
    p.add_argument("--input_pattern", help="sets input.pattern")
    p.add_argument("--output_path", help="sets output.path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a config override, as `layerbeam run --set` (repeatable)")
    p.add_argument("--overrides", dest="joined", default="", metavar="'K=V;K=V'", help="config overrides in one flag, separated by ';' (a Flex Template parameter cannot repeat)")
    p.add_argument("--overwrite", nargs="?", const="true", default="false", type=_flag, help="replace an existing complete output (true/false; bare means true)")
    p.add_argument("--plan_only", nargs="?", const="true", default="false", type=_flag, help="print the size plan and stop")
    p.add_argument("--unsafe_model", nargs="?", const="true", default="false", type=_flag, help="load .keras/.h5 files with Python code; only for files you trust")
    p.add_argument("--max_shards", type=int, help="smoke run: only the first N shards")
    p.add_argument("--max_examples_per_shard", type=int, help="smoke run: at most N records per shard")
    p.add_argument("--max_dead_letter_fraction", type=float, help="fail above this fraction of dead letters")
    p.add_argument("--quiet", nargs="?", const="true", default="false", type=_flag, help="print only the summary")
    return p


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def run_command_line(argv: Sequence[str], config_path: str | None = None) -> list[str]:
    """The `layerbeam run` arguments (without the program name) for these launcher flags.

    `config_path` replaces `--config` (main passes a local copy of a remote config)."""
    args, beam = _parser().parse_known_args(list(argv))
    out = ["run", config_path or args.config]
    if args.input_pattern:
        out += ["--set", f"input.pattern={args.input_pattern}"]
    if args.output_path:
        out += ["--set", f"output.path={args.output_path}"]
    for o in args.overrides + [s.strip() for s in args.joined.split(";") if s.strip()]:
        out += ["--set", o]
    for name in ("overwrite", "plan_only", "unsafe_model", "quiet"):
        if getattr(args, name):
            out.append("--" + name.replace("_", "-"))
    for name in ("max_shards", "max_examples_per_shard", "max_dead_letter_fraction"):
        value = getattr(args, name)
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out + beam


def _local_config(url: str, folder: str) -> str:
    """A local path for the config: itself, or a copy of a remote one (same file name, so
    error messages still name it recognisably)."""
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://")
    import fsspec

    path = os.path.join(folder, posixpath.basename(url.rstrip("/")) or "config.yaml")
    try:
        with fsspec.open(url, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
    except (OSError, ValueError, ImportError) as e:
        from .transforms.errors import first_line

        print(f"layerbeam: error: cannot read the config {url!r} ({first_line(e)}); check the URL and this machine's credentials for it", file=sys.stderr)
        raise SystemExit(2) from None
    logging.getLogger("layerbeam").info("config %s (copied to %s)", url, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import EXIT_USAGE
    from .cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, _ = _parser().parse_known_args(argv)
    except SystemExit as e:  # argparse already printed its one line
        return EXIT_USAGE if e.code else 0
    logging.getLogger(_JOB_ID_LOGGER).setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="layerbeam-launch-") as folder:
        return cli_main(run_command_line(argv, _local_config(args.config, folder)))


if __name__ == "__main__":
    sys.exit(main())
