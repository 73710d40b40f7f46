"""Before any work: preflight checks, the size plan, the run id, the example estimate."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .config import ConfigError, JobConfig, config_to_dict, to_spec
from .transforms._fs import is_local, require_filesystem
from .transforms.errors import ModelError, SelectionError, first_line
from .transforms.formats import make_writer
from .transforms.schema import column_types, output_schema, stored_bytes, unreadable_by
from .transforms.commit import OutputLock, versions
from .transforms.staging import OutputLayout
from .transforms.versions import extraction_fingerprint, latest_manifest, manifest_version

__all__ = ["Plan", "OverCapError", "prepare", "human", "manifest_base"]


class OverCapError(ConfigError):
    """The selected outputs exceed `layers.max_bytes_per_example`; `.plan` says by how much."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do, known before any work starts."""

    config: dict
    spec: Any  # the library's JobSpec (`config.to_spec`): what travels to workers
    run_id: str
    model_fingerprint: str
    input_shapes: dict
    outputs: list  # [OutputSpec]
    shards: int
    input_bytes: int
    estimated_examples: int | None
    inputs: tuple = ()  # ((shard id, (paths …), bytes, version), …); () for `images`, listed in the pipeline
    # `images`: what the launcher saw of the input (`folders.Survey`, counts only): prefixes,
    # how many it listed, whether the figures are exact; None for other formats.
    listing: dict | None = None
    reading: tuple = ()  # ((model input, how it is read and preprocessed), …) for the size plan
    # A smoke run (`input.max_shards` below the shard count, or `max_examples_per_shard`):
    # its manifest says `sample`, and it never replaces a full output.
    sample: bool = False
    shards_total: int = 0
    # Why the run would be refused at the output (`--plan-only` prints it instead of failing).
    output_problem: str | None = None
    # The model the checks loaded (`transforms.models.LauncherModel`); a worker that runs in
    # this process takes it instead of loading its own. Never pickled to workers.
    launcher_model: Any = dataclasses.field(default=None, repr=False, compare=False)
    # Versions (incremental builds): the latest committed version this run builds on (None:
    # no output yet), what happens to each input shard ({new, changed, reused, removed,
    # redone, rebuild}), the shards taken from that version (their small summaries, with
    # their ids in this listing), and whether there is nothing to do.
    parent: int | None = None
    delta: dict | None = None
    reuse: tuple = ()
    up_to_date: bool = False
    extraction: str = ""

    @property
    def to_extract(self) -> int:
        """Shards the run extracts (all of them, less those reused)."""
        return self.shards - len(self.reuse)

    @property
    def parquet_encoding(self) -> str | None:
        """The Parquet encoding of tensor columns; None for TFRecord."""
        out = self.config["output"]
        return out.get("parquet_encoding", "portable") if out.get("format", "parquet") == "parquet" else None

    def stored_bytes(self, spec) -> int:
        """One output's bytes per example as stored (the `portable` and `list` Parquet
        encodings widen float16)."""
        return stored_bytes(spec, self.parquet_encoding)

    @property
    def unreadable_by(self) -> dict[str, str]:
        """Readers that cannot open this output (an opt-in Parquet encoding), with why."""
        return unreadable_by(self.parquet_encoding, [s.dtype for s in self.outputs])

    @property
    def bytes_per_example(self) -> int:
        return sum(self.stored_bytes(s) for s in self.outputs)

    @property
    def projected_bytes(self) -> int | None:
        return None if self.estimated_examples is None else self.estimated_examples * self.bytes_per_example


def prepare(cfg: JobConfig, plan_only: bool = False) -> Plan:
    """Every check that can fail before work starts, and the size plan.

    Raises:
        ConfigError: the model cannot be loaded, a selector matches nothing, the input
            matches no file, the output is complete already or holds foreign files
            (without overwrite), another run is writing it, a half-built run of a
            different config is staged for it (without overwrite), it is not writable,
            or the outputs exceed `layers.max_bytes_per_example`, or the output path is,
            holds or lies where the input pattern reads, or `input.compression` does not
            match the files.

    With `plan_only`, problems at the output do not raise: the plan says them
    (`Plan.output_problem`), since planning writes nothing.
    """
    from .transforms.devices import discover_gpus, precision
    from .transforms.layers import trace_and_select
    from .transforms.models import LauncherModel, describe_preprocess, load_model, model_fingerprint, preprocess_fn
    from .transforms.readers import check_inputs, check_shards, estimate_examples, folders, match_shards
    from .transforms.readers.tensors import describe

    job = to_spec(cfg)
    for what, url in (("input.pattern", cfg.input.pattern), ("output.path", cfg.output.path)):
        require_filesystem(what, url)
    # Memory growth before this process touches a GPU, or the launcher's model load below
    # would reserve the whole device for the rest of the run.
    discover_gpus()
    images = cfg.input.format == "images"
    try:
        if images:  # listed per folder inside the pipeline; here only the prefixes and a sample
            survey = folders.survey(cfg.input.pattern, cfg.input.files_per_shard, cfg.input.max_examples_per_shard)
            shards = [survey.first] if survey.first else []
        else:
            shards = match_shards(cfg.input.pattern, cfg.input.format, cfg.input.files_per_shard, spec=job.input)
    except Exception as e:  # noqa: BLE001 - any client's failure (auth, network, bucket) is the user's to fix
        raise ConfigError(f"input.pattern {cfg.input.pattern!r} cannot be listed: {type(e).__name__}: {first_line(e)}; check the path, the network and your credentials") from None
    if not shards:
        raise ConfigError(f"input.pattern {cfg.input.pattern!r} matches no file; check the path (a glob such as data/*.tfrecord)")
    if images:
        _check_not_over_inputs(cfg, (), [p.url for p in survey.prefixes])
        total_shards = survey.shards
        planned = min(total_shards, cfg.input.max_shards) if cfg.input.max_shards else total_shards
        part = planned / max(1, total_shards)
        input_bytes, estimated = round(survey.bytes * part), round(survey.examples * part)
        listing = {"prefixes": len(survey.prefixes), "prefixes_listed": survey.listed, "exact": survey.complete,
                   "prefixes_digest": hashlib.sha256("\n".join(f"{p.url}\t{int(p.recursive)}" for p in survey.prefixes).encode("utf-8", "surrogateescape")).hexdigest()[:16]}
    else:
        all_shards = shards
        _check_not_over_inputs(cfg, [p for s in shards for p in s.paths])
        if cfg.input.format == "tfrecord":
            _check_compression(cfg, shards[0].paths[0])
        if cfg.input.max_shards:
            shards = shards[: cfg.input.max_shards]
        total_shards, planned, listing = len(all_shards), len(shards), None
        input_bytes = sum(s.size for s in shards)
    # The workers build the model under this policy; built under the same one here, the
    # checks see what they will see, and an in-process worker can take this copy.
    try:
        with precision(cfg.batching.precision):
            model = load_model(job.model)
            graph, specs = trace_and_select(job, model)
            offered = LauncherModel.capture(model, model_fingerprint(model), (graph, specs, job))
    except (ModelError, SelectionError) as e:
        msg = str(e).replace("{model}", cfg.model.source)
        if cfg.input.image_size and msg.startswith("tracing model"):
            built = [tuple(t.shape[1:3]) for t in getattr(locals().get("model"), "inputs", [])]
            fits = [list(b) for b in built if None not in b]
            raise ConfigError(
                f"input.image_size {list(cfg.input.image_size)} does not fit the model {cfg.model.source!r}"
                + (f", which was built for {fits[0]}" if fits else "")
                + f" (Keras: {first_line(e).split(' failed: ', 1)[-1][:200]}); "
                + (f"set input.image_size: {fits[0]} or remove it" if fits else "remove input.image_size")
            ) from None
        raise ConfigError(msg) from None
    row_columns = column_types(job.input)
    for spec in specs:
        if spec.name in row_columns:
            raise ConfigError(
                f"output name {spec.name!r} (from {spec.path!r}) is also the name of the {spec.name!r} column; "
                f"rename the output with {{layer: {spec.path}, as: <another name>}}"
            )
    try:
        plans = check_inputs(job.input, graph.input_shapes, graph.input_dtypes)
        check_shards(job.input, shards)
        if any(p.kind == "image" for p in plans.values()):
            preprocess_fn(cfg.input.preprocess, cfg.model.source)  # resolved here, not first on a worker
    except (ValueError, ModelError) as e:
        raise ConfigError(str(e)) from None
    how = describe_preprocess(cfg.input.preprocess, cfg.model.source)
    reading = tuple((n, describe(p, how)) for n, p in plans.items())
    fp = offered.fingerprint
    config = config_to_dict(cfg)
    latest = latest_manifest(OutputLayout(cfg.output.path, "").out)
    parent = manifest_version(latest) if latest else None
    # `images` are listed inside the pipeline (no launcher list to match): the pipeline
    # decides what is reused once it has listed (`delta_in_pipeline`, see `run.build_pipeline`)
    delta, reuse = _delta(latest, None if images else shards, cfg.output.overwrite)
    # `images`: no per-image list here, so the run id holds no input listing: the same
    # command finds its staged shards, each taken only if its span and version still match
    # the pipeline's listing (a changed or new folder's shards are read again, see `folders`).
    run_id = _run_id(config, fp, shards if not images else None, parent)
    plan = Plan(
        config=config,
        spec=job,
        run_id=run_id,
        model_fingerprint=fp,
        input_shapes=graph.input_shapes,
        outputs=specs,
        shards=planned,
        input_bytes=input_bytes,
        estimated_examples=estimated if images else estimate_examples(job.input, shards),
        inputs=() if images else tuple((s.id, s.paths, s.size, s.version) for s in shards),
        listing=listing,
        reading=reading,
        launcher_model=offered,
        sample=planned < total_shards or cfg.input.max_examples_per_shard is not None,
        shards_total=total_shards,
        parent=parent,
        delta=delta,
        reuse=reuse,
        extraction=extraction_fingerprint(config, fp),
    )
    if latest is not None and not cfg.output.overwrite and _differences_from(latest, plan) is None and plan.sample == bool(latest.get("sample")):
        if not (delta.get("rebuild") or delta.get("in_pipeline") or delta["new"] or delta["changed"] or delta["removed"] or delta["redone"]):
            # nothing to do: nothing is written, not even the staging folder or the lock
            return dataclasses.replace(plan, up_to_date=True)
    if plan.bytes_per_example > cfg.layers.max_bytes_per_example:
        biggest = sorted(specs, key=lambda s: -plan.stored_bytes(s))[:3]
        raise OverCapError(
            f"the {len(specs)} selected outputs take {human(plan.bytes_per_example)} ({plan.bytes_per_example:,} B) per example, "
            f"over the cap layers.max_bytes_per_example = {human(cfg.layers.max_bytes_per_example)}"
            + (f" (~{human(plan.projected_bytes)} for ~{plan.estimated_examples:,} examples)" if plan.projected_bytes else "")
            + f"; largest: {', '.join(f'{s.name} {human(plan.stored_bytes(s))}' for s in biggest)}; "
            f"reduce them (layers.reduce: mean, dtype: float16), select fewer, "
            f"or raise the cap knowingly: --set layers.max_bytes_per_example={plan.bytes_per_example}",
            plan,
        )
    files = projected_files(cfg, shards if not images else planned, plan.estimated_examples)
    if files > cfg.output.max_files:
        raise ConfigError(
            f"output.partition_by {list(cfg.output.partition_by)} with {planned:,} input shards would write ~{files:,} data files, "
            f"over output.max_files = {cfg.output.max_files:,} (every shard writes one file per partition value it holds); "
            f"partition by fewer or coarser columns, use larger shards (input.files_per_shard), or raise the cap knowingly: --set output.max_files={files}"
        )
    try:
        _check_output(cfg, run_id, OutputLayout(cfg.output.path, run_id), plan.sample, plan, latest)
    except ConfigError as e:
        if not plan_only:
            raise
        plan = dataclasses.replace(plan, output_problem=str(e))
    return plan


def projected_files(cfg: JobConfig, shards: Sequence | int, estimated_examples: int | None) -> int:
    """Data files the run is projected to write: per shard, one per partition value it holds
    times its rows over `output.max_rows_per_file`.

    `shards`: the shards, or (`images`, listed in the pipeline) how many are planned. Partition
    values are known before work only for an `images` input partitioned by `label`: each
    shard is one folder's files, so one label; otherwise each shard counts one value, a
    lower bound.
    """
    import math

    n = shards if isinstance(shards, int) else len(shards)
    per_shard_rows = (estimated_examples or 0) / max(1, n)
    per_value = max(1, math.ceil(per_shard_rows / cfg.output.max_rows_per_file)) if not cfg.output.partition_by else 1
    if cfg.input.format == "images" and tuple(cfg.output.partition_by) == ("label",):
        return n
    return n * per_value


def _delta(latest: Mapping | None, shards: Sequence | None, overwrite: bool) -> tuple[dict | None, tuple]:
    """What an incremental run does with each shard of the listing, against the latest version.

    A shard whose identity (`shard_identity`: files, bytes, content fingerprint) is an input of
    the latest version is reused: its committed files and kept key hashes go into the new
    version. Unless it had lost keys to the duplicate-key check against a shard that is not
    reused now (changed or gone): its committed files lack rows a from-scratch build would
    keep, so it is extracted again (`redone`; repeated until no reused shard depends on a
    re-extracted one). Shards of the listing that match nothing are `new`, or `changed` if
    the latest version read the same paths with other content; inputs of the latest version
    matching no shard of the listing are `removed`. With `overwrite` nothing is reused
    (`rebuild`). `shards` None (`images`: listed in the pipeline, not here): `{in_pipeline:
    True}`, decided there by `delta_in_pipeline`.

    Returns:
        (delta counts or None without an output, reuse entries: one small summary per reused
        shard, keyed by its id in this listing).
    """
    from .transforms.readers import shard_identity

    if latest is None:
        return None, ()
    from .transforms.versions import files_of, inputs_of

    if shards is None and not overwrite:  # `images`: decided in the pipeline once listed (`delta_in_pipeline`)
        return {"in_pipeline": True}, ()
    root = OutputLayout(latest["config"]["output"]["path"], "").out
    olds = inputs_of(latest, root)
    if overwrite:
        return {"new": len(shards or ()), "changed": 0, "reused": 0, "removed": len(olds), "redone": 0, "rebuild": True}, ()
    by_identity = {shard_identity(i): i for i in olds if i.get("keys") and "version" in i}
    found = {s.id: by_identity[shard_identity(s)] for s in shards if shard_identity(s) in by_identity}
    kept = {e["shard"] for e in found.values()}
    redone: set[str] = set()
    while True:
        drop = [sid for sid, e in found.items() if any(w not in kept for w in e.get("lost_to") or ())]
        if not drop:
            break
        for sid in drop:
            kept.discard(found.pop(sid)["shard"])
        redone.update(drop)
    old_places = {_place(i) for i in olds}
    new_places = {_place(s) for s in shards}
    fresh = [s for s in shards if s.id not in found and s.id not in redone]
    changed = sum(1 for s in fresh if _place(s) in old_places)
    delta = {
        "new": len(fresh) - changed, "changed": changed, "reused": len(found),
        "removed": sum(1 for i in olds if _place(i) not in new_places), "redone": len(redone),
    }
    files: dict[str, list] = {}
    for f in files_of(latest, root):
        files.setdefault(f.get("shard"), []).append({"path": f["path"], "rows": f["rows"], "bytes": f["bytes"]})
    errors: dict[str, list] = {}
    for e in latest.get("shard_errors", []):
        errors.setdefault(e.get("shard"), []).append({k: v for k, v in e.items() if k not in ("shard", "records_kept")})
    reuse = tuple(
        {
            "shard": sid, "paths": list(e.get("paths") or ()), "bytes_in": e["bytes"],
            "span": (e["prefix"], e["first"], e["last"], e["count"]) if "prefix" in e else None, "input_version": e.get("version", ""), "read": e["records"],
            "rows": e["rows"], "dead_letters": e["dead_letters"], "dead_reasons": e.get("dead_reasons") or {}, "dead_letter_file": e.get("dead_letter_file"),
            "keys": e["keys"], "dedupe_lost": e.get("dedupe_lost", 0), "files": files.get(e["shard"], []), "shard_errors": errors.get(e["shard"], []),
            "stats": e.get("stats"), "timing": e.get("timing"),
        }
        for sid, e in sorted(found.items())
    )
    return delta, reuse


def _place(shard) -> tuple:
    """Where a shard reads (a listed `Shard` or a manifest `inputs` entry), whatever its content:
    a shard read from the same place with other content is `changed`. An image shard's place
    is its id, one folder's k-th chunk (`folders.shard_id`): its span moves when a file is
    added or removed before its end; any other shard's place is its files."""
    if isinstance(shard, Mapping):
        return ("span", shard["shard"]) if "prefix" in shard else tuple(shard.get("paths") or ())
    return ("span", shard.id) if getattr(shard, "span", None) else tuple(shard.paths)


def delta_in_pipeline(listed: Sequence, out: str, parent: int | None, sample: bool) -> tuple[dict | None, tuple]:
    """`_delta` for an `images` input, run inside the pipeline once every folder is listed
    (`listed`: the shard descriptions, one per shard, small and bounded by the shard count).

    Reads the latest version of `out` there (the commit refuses if it is no longer `parent`).
    The delta gets `up_to_date` True when nothing is new, changed, removed or redone (and the
    latest version is a sample exactly when this run is): the commit then writes nothing.
    """
    latest = latest_manifest(OutputLayout(out, "").out)
    if latest is None or manifest_version(latest) != parent:
        return None, ()  # moved: `check_results` refuses with the versions named
    delta, reuse = _delta(latest, list(listed), False)
    nothing = not (delta["new"] or delta["changed"] or delta["removed"] or delta["redone"])
    return dict(delta, up_to_date=nothing and sample == bool(latest.get("sample"))), reuse


def _run_id(config: Mapping, model_fingerprint: str, shards: Sequence | None, parent: int | None = None) -> str:
    """The run fingerprint: config (less `output.overwrite`), model weights, input shards, and
    the version the run builds on.

    Deterministic: the same command over the same input gives the same id, which is how a
    re-run after a crash finds its staged shards (and how a changed config does not). The
    parent version makes file names unique per version (they carry the run id): a file name
    in an output names one content for good, which is what lets older versions be read.
    `shards` None (`images`, listed in the pipeline): config and model only; every staged
    shard is then checked against the pipeline's listing by its span and version.
    """
    if shards is None:
        key = dict(config)
        key["output"] = {k: v for k, v in config["output"].items() if k not in ("overwrite", "max_dead_letter_fraction")}
        parts = [key, model_fingerprint, "images listed per folder"] + ([parent] if parent is not None else [])
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    key = dict(config)
    # Not what the run computes: a higher dead-letter limit or --overwrite resumes the same run.
    key["output"] = {k: v for k, v in config["output"].items() if k not in ("overwrite", "max_dead_letter_fraction")}
    # the version is the store's content fingerprint: a same-size rewrite is another input
    inputs = [[list(s.paths), s.size] + ([s.version] if getattr(s, "version", "") else []) for s in shards]
    parts = [key, model_fingerprint, inputs] + ([parent] if parent is not None else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _differences_from(latest: Mapping, plan: Plan) -> str | None:
    """Why the latest version's rows differ from what this run extracts (None: they don't)."""
    from .transforms.versions import extraction_fields

    mine, theirs = extraction_fields(plan.config), extraction_fields(latest.get("config", {}))
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    parts = []
    if keys:
        parts.append("differs in " + ", ".join(f"{k} ({theirs.get(k)!r} → {mine.get(k)!r})" for k in keys[:4]) + (" …" if len(keys) > 4 else ""))
    old_fp = (latest.get("model") or {}).get("fingerprint")
    if old_fp != plan.model_fingerprint:
        parts.append(f"model weights differ (fingerprint {old_fp} → {plan.model_fingerprint})")
    return "; ".join(parts) or None


def _check_output(cfg: JobConfig, run_id: str, layout, sample: bool = False, plan: Plan | None = None, latest: Mapping | None = None) -> None:
    """Refuse, before any work, an output this run must not write (see `prepare`).

    `--overwrite` replaces only what layerbeam wrote: a folder with layerbeam's manifest,
    or one with layerbeam's staging beside it (a half-published run). Anything else at the
    output path is refused with or without it, and a smoke run never replaces a full output.
    """
    path = cfg.output.path
    overwrite = cfg.output.overwrite
    ours = _is_layerbeam_output(layout)
    if layout.fs.exists(layout.out) and not layout.fs.isdir(layout.out):
        raise ConfigError(f"output.path {path!r} is a file, not a folder; layerbeam will not replace it: choose another output.path")
    if layout.has_foreign_files() and not ours:
        raise ConfigError(
            f"output {path!r} holds files that layerbeam did not write (no _manifest.json, no staging folder), and layerbeam never deletes those; "
            "choose another output.path, or move them away yourself"
        )
    if layout.is_complete() and sample and not _committed_is_sample(layout):
        raise ConfigError(
            f"output {path!r} holds a complete full output, and this is a smoke run (--max-shards / --max-examples-per-shard), which never replaces one; "
            "write the sample elsewhere: --set output.path=<another folder>"
        )
    if layout.is_complete() and not overwrite:
        why = _differences_from(latest, plan) if latest is not None and plan is not None else "it was not written by layerbeam's run"
        if why:
            v = manifest_version(latest) if latest else "?"
            raise ConfigError(
                f"output {path!r} holds version {v}, extracted differently ({why}); pass --overwrite to build a new lineage from scratch "
                f"(version {v + 1 if latest else '?'}; earlier versions stay readable until `layerbeam vacuum`) or choose another output.path"
            )
    if layout.has_foreign_files() and not overwrite:
        raise ConfigError(f"output {path!r} holds a half-published layerbeam output (files but no _SUCCESS); pass --overwrite to replace it, or choose another output.path")
    lock = OutputLock(layout)
    holder = lock.holder()
    if holder is not None:
        raise lock.error(holder)
    others = [r for r in layout.other_runs() if not superseded(layout, r, plan)]
    if others and not overwrite:
        info = layout.read_run_info(others[0])
        why = _differences(info, cfg, run_id) if info else "its config is unknown"
        raise ConfigError(
            f"output {path!r} has a half-built run {others[0]} from a different config ({why}); re-run that config to finish it, "
            f"or pass --overwrite to discard it and build this one"
        )
    _check_writable(layout)


def superseded(layout, run_id: str, plan: Plan | None) -> bool:
    """A half-built run staged for the output extracted as this run does, over another listing
    (a scheduled run that crashed before the input grew): this run replaces it."""
    if plan is None:
        return False
    from .transforms.versions import extraction_fingerprint

    info = layout.read_run_info(run_id) or {}
    return bool(info.get("config")) and extraction_fingerprint(info["config"], info.get("model_fingerprint", "")) == plan.extraction


def _is_layerbeam_output(layout) -> bool:
    """The output path holds what layerbeam wrote: its manifest, or its staging beside it."""
    try:
        with layout.fs.open(f"{layout.out}/{layout.MANIFEST}", "r") as f:
            if "layerbeam_manifest" in json.load(f):
                return True
    except (OSError, ValueError):
        pass
    return layout.fs.exists(layout.staging_root)


def _committed_is_sample(layout) -> bool:
    try:
        with layout.fs.open(f"{layout.out}/{layout.MANIFEST}", "r") as f:
            return bool(json.load(f).get("sample"))
    except (OSError, ValueError):
        return False


def _norm(path: str) -> str:
    """A path as compared here: no file://, no trailing /, local paths absolute and resolved."""
    path = path[len("file://"):] if path.startswith("file://") else path
    if "://" not in path:
        path = os.path.realpath(path)
    return path.rstrip("/")


def _glob_regex(pattern: str):
    """fsspec glob → regex: `**` crosses folders, `*` and `?` do not."""
    import re

    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _check_not_over_inputs(cfg: JobConfig, files: Sequence[str], folders_: Sequence[str] = ()) -> None:
    """Refuse an output path that is, contains or lies inside an input file or the input
    folder, or whose files the input pattern would read: overwriting would delete the
    input, and a later run would read its own output (or its staging) as input.
    `folders_`: the folders an `images` input is listed from (its files are not listed here)."""
    out = _norm(cfg.output.path)
    staging = f"{out}.layerbeam-staging"
    history = f"{out}.layerbeam-history"
    pattern = _norm(cfg.input.pattern)
    if not any(ch in pattern for ch in "*?["):  # a folder: read as match_shards reads it
        pattern += "/**" if cfg.input.format == "images" else "/*"
    static = pattern
    for ch in "*?[":
        static = static.split(ch, 1)[0]
    root = static.rsplit("/", 1)[0]
    fix = "choose an output.path outside the input (e.g. a sibling folder)"
    for target in (out, staging, history):
        if target == root or root.startswith(target + "/"):
            raise ConfigError(f"output.path {cfg.output.path!r} is or contains the input folder {root!r}; {fix}")
    for p in files:
        p = _norm(p)
        if p == out or p.startswith((out + "/", staging + "/", history + "/")):
            raise ConfigError(f"output.path {cfg.output.path!r} contains the input file {p!r}; {fix}")
        if out.startswith(p + "/"):
            raise ConfigError(f"output.path {cfg.output.path!r} lies inside the input file {p!r}; {fix}")
    for p in folders_:
        p = _norm(p)
        if p in (out, staging, history) or p.startswith((out + "/", staging + "/", history + "/")):
            raise ConfigError(f"output.path {cfg.output.path!r} is or contains the input folder {p!r}; {fix}")
    leaf = pattern.rsplit("/", 1)[-1].replace("**", "x").replace("*", "x").replace("?", "x")
    regex = _glob_regex(pattern)
    for cand in (f"{out}/{leaf}", f"{out}/label=1/{leaf}", f"{staging}/run/shards/s00000/{leaf}", f"{staging}/run/final/label=1/{leaf}"):
        if regex.match(cand):
            raise ConfigError(f"output.path {cfg.output.path!r} lies where input.pattern {cfg.input.pattern!r} reads: its files would become input; {fix}")


def _check_compression(cfg: JobConfig, first_file: str) -> None:
    """A TFRecord file's first bytes say whether it is gzip or zlib compressed; a mismatch
    with `input.compression` would fail every shard (no rows), so it is refused here."""
    from .transforms._fs import fsspec_fs

    try:
        fs, path = fsspec_fs(first_file)
        with fs.open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return  # unreadable: the run's reader says why, per shard
    if len(head) < 2:
        return
    gzip = head == b"\x1f\x8b"
    zlib = head[0] == 0x78 and (head[0] * 256 + head[1]) % 31 == 0
    found = "GZIP" if gzip else "ZLIB" if zlib else ""
    said = cfg.input.compression
    if said == "GZIP" and not gzip or said == "ZLIB" and not zlib or said == "" and gzip:
        what = {"GZIP": "gzip-compressed", "ZLIB": "zlib-compressed", "": "not compressed"}[found]
        raise ConfigError(
            f"input.compression is {said or 'none'!r} but {first_file!r} is {what}; set input.compression={found or chr(39) * 2}"
        )


def _differences(info: Mapping, cfg: JobConfig, run_id: str) -> str:
    """Which config fields, model or input shards differ between a staged run and this one."""
    from .transforms.versions import flatten

    mine = flatten(config_to_dict(cfg))
    theirs = flatten(info.get("config", {}))
    keys = sorted(k for k in set(mine) | set(theirs) if k not in ("output.overwrite", "output.max_dead_letter_fraction") and mine.get(k) != theirs.get(k))
    parts = []
    if keys:
        parts.append("differs in " + ", ".join(keys[:6]) + (" …" if len(keys) > 6 else ""))
    if not keys:
        parts.append("same config, but different model weights or input files")
    return "; ".join(parts)


def _check_writable(layout) -> None:
    """Write and delete a probe file beside the output; leave nothing behind.

    On a local disk the folders the probe needed are removed again (deepest first, only
    those it created, only if empty). Object stores have no folders: deleting the probe
    leaves nothing there, and nothing else is touched.
    """
    import os

    probe = f"{layout.staging_root}/.probe-{time.time_ns()}"
    try:
        created: list[str] = []
        for attempt in range(3):  # another run's commit may remove an empty staging folder meanwhile
            if is_local(layout.fs):
                d = layout.staging_root
                while d and not os.path.exists(d):
                    if d not in created:
                        created.append(d)
                    d = os.path.dirname(d.rstrip("/"))
                created.sort(key=len, reverse=True)  # deepest first
            layout.fs.makedirs(layout.staging_root, exist_ok=True)
            try:
                with layout.fs.open(probe, "w") as f:
                    f.write("ok")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            layout.fs.rm(probe)
        except FileNotFoundError:  # removed with the staging folder by that commit
            pass
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:  # not empty: another run put something there meanwhile
                break
    except OSError as e:
        raise ConfigError(f"output.path {layout.out!r} is not writable ({e.strerror or e}); choose a folder you can write to") from None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def manifest_base(plan: Plan) -> dict:
    return {
        "layerbeam_manifest": 1,
        "run_id": plan.run_id,
        "config": plan.config,
        "model": {
            "source": plan.config["model"]["source"],
            "weights": plan.config["model"]["weights"],
            "fingerprint": plan.model_fingerprint,
            "input_shapes": {k: list(v) for k, v in plan.input_shapes.items()},
        },
        "outputs": [dict(s.to_json(), bytes_per_example=plan.stored_bytes(s)) for s in plan.outputs],
        "storage": make_writer(plan.spec.output, output_schema(plan.outputs, column_types(plan.spec.input))).storage_spec(),
        "bytes_per_example": plan.bytes_per_example,
        "sample": plan.sample,  # a smoke run: `show` and `read` say so
        "shards_planned": plan.shards,
        "shards_total": plan.shards_total,
        "versions": versions(),
        "parent": plan.parent,  # the version this run builds on: the commit refuses if another run moved it
        "extraction": plan.extraction,
        "delta": plan.delta,
    }
