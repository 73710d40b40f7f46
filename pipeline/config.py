"""The layerbeam job config: a validated, frozen structure loaded from YAML.

Every field has a default and a description; unknown keys are rejected. `--set a.b=c` on
the command line overrides any field before validation (`apply_overrides`).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .transforms.errors import ConfigError

__all__ = [
    "ConfigError",
    "InputConfig",
    "TensorInputConfig",
    "ModelConfig",
    "OutputSpecConfig",
    "LayersConfig",
    "BatchingConfig",
    "OutputConfig",
    "JobConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "to_spec",
]

Reduce = Literal["none", "mean", "max", "flatten"]
DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TensorDType = Literal["float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool", "string"]


class TensorInputConfig(_Strict):
    """One model input read as a tensor (not an encoded image) from a feature."""

    feature: str = Field(..., description="the feature (TFRecord) holding the values")
    dtype: TensorDType | None = Field(None, description="dtype the values are read as (default: the model input's); cast to the model input's dtype after reading")
    shape: tuple[int | None, ...] | None = Field(None, description="shape per example, without the batch axis; null marks a variable size, padded per batch (default: the model input's)")
    encoding: Literal["list", "raw"] = Field("list", description="list: a float_list/int64_list/bytes_list feature holding the values row-major; raw: one bytes value holding the tensor's raw little-endian bytes (tf.io.decode_raw)")
    pad_value: float | int | str = Field(0, description="value variable-size inputs are padded with, per batch, to the longest example")


class InputConfig(_Strict):
    pattern: str = Field(..., description="file pattern of the input shards: a glob over local paths, gs://, or any fsspec URL (memory://, s3:// …)")
    format: Literal["tfrecord", "images", "parquet", "webdataset", "tfds"] = Field("tfrecord", description="tfrecord: files of tf.train.Example; images: jpg/png files, label = parent folder name; parquet: tables, one file per shard, columns mapped like features; webdataset: .tar shards, members grouped by basename, extensions mapped like features; tfds: a prepared TFDS dataset (tfds_name, tfds_split; pattern = its data_dir)")
    compression: Literal["", "GZIP", "ZLIB"] = Field("", description="TFRecord compression")
    image_feature: str = Field("image/encoded", description="bytes feature holding the encoded image (single-input models)")
    inputs: dict[str, str | TensorInputConfig] = Field(default_factory=dict, description="model input name → a feature name (an encoded image, decoded, resized and preprocessed) or a tensor {feature, dtype, shape, encoding, pad_value} (numbers, token ids, strings)")
    key_feature: str | None = Field(None, description="bytes/string feature used as the row key; default: '<shard file name>:<record index>' (images: the file path)")
    label_feature: str | None = Field(None, description="int64 or bytes feature copied to the 'label' column (images: the folder name)")
    label_type: Literal["int64", "string"] = Field("int64", description="type of label_feature")
    passthrough: dict[str, Literal["int64", "float32", "string"]] = Field(default_factory=dict, description="extra scalar features copied to output columns, with their type")
    image_size: tuple[PositiveInt, PositiveInt] | None = Field(None, description="[height, width] images are resized to; default: the model's input size")
    channels: int = Field(3, ge=1, le=4, description="channels images are decoded to")
    resize_method: Literal["bilinear", "nearest", "bicubic", "area", "lanczos3"] = Field("bilinear", description="tf.image.resize method")
    preprocess: str = Field("auto", description="'auto' (the keras.applications module's preprocess_input, else none), 'none' (float 0..255), 'scale' (0..1), 'tf' (-1..1), 'caffe', 'torch', or 'module:function'")
    max_image_pixels: int | None = Field(50_000_000, ge=1, description="images whose header declares more pixels (width × height) become image_too_large dead letters before decoding (JPEG, PNG, GIF, BMP); null: no cap")
    exif_orientation: bool = Field(True, description="turn JPEG images as their EXIF orientation tag says (phone photos), as PIL's ImageOps.exif_transpose does; false: pixels as stored")
    tfds_name: str | None = Field(None, description="tfds format: the dataset's name as TFDS knows it (name, name/config, name:version); input.pattern is its data_dir, where it is already prepared")
    tfds_split: str = Field("train", description="tfds format: the split to read (train, test, …)")
    files_per_shard: int = Field(512, ge=1, description="images format: image files per unit of work, cut per folder")
    max_shards: int | None = Field(None, ge=1, description="smoke runs: process only the first N shards (sorted by path)")
    max_examples_per_shard: int | None = Field(None, ge=1, description="smoke runs: read at most N records of each shard")


class ModelConfig(_Strict):
    source: str = Field(..., description="a .keras or .h5 file, 'keras.applications.<Name>', or 'module:function' returning a keras.Model")
    weights: str | None = Field(None, description="keras.applications only: null (random, seeded), 'imagenet', or a weights file path")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the application or factory, e.g. {include_top: false}")
    input_shape: tuple[int, ...] | None = Field(None, description="input shape without the batch axis, for applications and Sequential models built without an Input")
    seed: int = Field(0, description="random seed applied before building, so random weights are the same on every worker")
    safe_mode: bool = Field(True, description="load .keras files in Keras safe mode (refuses Lambda layers with Python code); set false only for files you trust")
    custom_objects: tuple[str, ...] | dict[str, str] = Field((), description="custom classes the model needs: modules to import (whose keras.saving.register_keras_serializable classes register themselves), or {ClassName: 'module:attr'}; workers import them too")


class OutputSpecConfig(_Strict):
    layer: str = Field(..., description="what to tap: an exact path, a glob (block_*_relu), 're:<regex>', 'type:<LayerClass>', or 'all'")
    name: str | None = Field(None, alias="as", description="output column name (exact selections only); default: the layer path")
    reduce: Reduce | None = Field(None, description="none | mean | max (over spatial axes) | flatten; default: layers.reduce")
    dtype: DType | None = Field(None, description="float32 | float16 | bfloat16 (stored as float32 rounded to bfloat16 precision); default: layers.dtype")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LayersConfig(_Strict):
    select: tuple[OutputSpecConfig, ...] = Field(..., min_length=1, description="the outputs to write, each a layer selector or a mapping {layer, as, reduce, dtype}")
    exclude: tuple[str, ...] = Field((), description="selectors removed from the selection (same syntax as layer)")
    reduce: Reduce = Field("mean", description="default reduction for every selected output")
    dtype: DType = Field("float32", description="default output dtype: float32 | float16 | bfloat16 (float32 values rounded to nearest-even bfloat16, stored as float32: every reader sees float32 and zstd+BYTE_STREAM_SPLIT shrinks it)")
    include_inputs: bool = Field(False, description="let 'all' and patterns match the model's input tensors too")
    max_bytes_per_example: int = Field(4 * 1024 * 1024, ge=1, description="refuse a selection whose outputs exceed this many bytes per example (raise it knowingly)")

    @field_validator("select", mode="before")
    @classmethod
    def _strings_are_layers(cls, v):
        if isinstance(v, (str, dict)):
            v = [v]
        return [{"layer": s} if isinstance(s, str) else s for s in v]


class BatchingConfig(_Strict):
    batch_size: int = Field(32, ge=1, description="examples per model call")
    max_batch_bytes: int = Field(256 << 20, ge=1 << 16, description="cap on output bytes per batch: with big (unreduced) outputs the batch shrinks below batch_size to stay under it")
    jit_compile: bool = Field(False, description="compile the extractor with XLA (try it on GPUs)")
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = Field("float32", description="Keras dtype policy the model computes in; mixed_float16 for GPUs with tensor cores")
    max_gpus: int | None = Field(None, ge=1, description="model copies per worker process: one per visible GPU, at most this many")


class OutputConfig(_Strict):
    path: str = Field(..., description="output directory (local path, gs://, or fsspec URL)")
    format: Literal["parquet", "tfrecord"] = Field("parquet", description="parquet (one row per example, tensor columns) | tfrecord (one tf.train.Example per example)")
    partition_by: tuple[str, ...] = Field((), description="Hive partition columns, from 'label' and passthrough columns")
    max_rows_per_file: int = Field(100_000, ge=1, description="upper bound on rows in one data file")
    row_group_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="target uncompressed bytes per Parquet row group")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression codec")
    compression_level: int | None = Field(1, description="codec level (zstd 1 is fastest with nearly the best ratio on activations)")
    parquet_encoding: Literal["portable", "arrow_tensor", "nested_float16", "list"] = Field(
        "portable",
        description="Parquet: how tensor columns are stored. portable (nested fixed-size lists of float32, float16 widened exactly; every reader we test opens it with the shape) | "
        "arrow_tensor (Arrow fixed_shape_tensor, float16 kept: the smallest files; Spark, DuckDB and Hugging Face datasets cannot read them) | "
        "nested_float16 (nested lists, float16 kept: Spark cannot read float16) | list (flat list<float32>, shape only in the metadata)",
    )
    tfrecord_compression: Literal["none", "gzip"] = Field("none", description="TFRecord: none, or gzip (smaller files, ~10x slower to write)")
    max_bytes_per_file: int = Field(256 * 1024 * 1024, ge=1024, description="TFRecord: start a new file after this many (uncompressed) bytes; Parquet files are bounded by max_rows_per_file")
    overwrite: bool = Field(False, description="replace an existing layerbeam output (only one: a folder without layerbeam's manifest or staging is never deleted)")
    max_dead_letter_fraction: float = Field(0.1, ge=0.0, le=1.0, description="fail the run (exit 1, no _SUCCESS, finished shards kept for a resumed run) when more than this fraction of the records read become dead letters; a run with no rows always fails")
    max_files: int = Field(100_000, ge=1, description="refuse, before any work, a run projected to write more data files than this (partition_by × shards × rows per file)")

    @model_validator(mode="before")
    @classmethod
    def _old_encoding_keys(cls, data):
        # Replaced by parquet_encoding: refused rather than mapped, because `parquet_compat:
        # false` meant the old default (arrow_tensor), which is no longer the default.
        if isinstance(data, dict):
            if "parquet_compat" in data:
                raise ValueError(
                    f"output.parquet_compat = {data['parquet_compat']!r} was replaced by output.parquet_encoding; "
                    "write output.parquet_encoding: list for the old compat layout, arrow_tensor for the old default, or delete the key for the portable default"
                )
            if "float16_byte_stream_split" in data:
                raise ValueError(
                    f"output.float16_byte_stream_split = {data['float16_byte_stream_split']!r} was replaced by output.parquet_encoding; "
                    "delete it (the portable default stores float32, which every reader decodes), or write output.parquet_encoding: nested_float16 to keep float16 readable by DuckDB"
                )
        return data


class JobConfig(_Strict):
    input: InputConfig
    model: ModelConfig
    layers: LayersConfig
    batching: BatchingConfig = BatchingConfig()
    output: OutputConfig

    @model_validator(mode="after")
    def _encoding_is_parquet(self):
        if "parquet_encoding" in self.output.model_fields_set and self.output.format != "parquet":
            raise ValueError(f"output.parquet_encoding is set but output.format is {self.output.format!r}; the encoding is for Parquet only, drop it or set output.format=parquet")
        return self

    @model_validator(mode="after")
    def _image_folders_have_no_features(self):
        if self.input.format == "images":
            set_ = [k for k in ("key_feature", "label_feature", "inputs", "passthrough") if getattr(self.input, k)]
            if set_:
                raise ValueError(
                    f"input.{set_[0]} is set, but input.format 'images' reads plain image files, which have no features "
                    "(the key is the file path and the label the folder name); remove it or write TFRecord examples"
                )
        return self

    @model_validator(mode="after")
    def _tfds_has_a_name(self):
        if self.input.format == "tfds" and not self.input.tfds_name:
            raise ValueError("input.format is 'tfds' but input.tfds_name is not set; name the prepared dataset (e.g. mnist) and set input.pattern to its data_dir")
        return self

    @model_validator(mode="after")
    def _features_are_distinct(self):
        i = self.input
        if i.key_feature and i.key_feature == i.label_feature:
            raise ValueError(
                f"input.key_feature and input.label_feature are both {i.key_feature!r}; the key must identify each example, "
                "the label is a class: point key_feature at a unique id feature, or leave it unset (then the key is '<file>:<record index>')"
            )
        if i.label_feature in i.passthrough and i.passthrough[i.label_feature] != i.label_type:
            raise ValueError(
                f"input.label_feature {i.label_feature!r} is also in input.passthrough as {i.passthrough[i.label_feature]}, "
                f"but input.label_type is {i.label_type}; a feature has one type: remove it from passthrough (it is in the 'label' column) "
                f"or make both the same"
            )
        return self

    @model_validator(mode="after")
    def _partitions_exist(self):
        cols = {"label"} if self.input.label_feature or self.input.format == "images" else set()
        cols |= set(self.input.passthrough)
        for p in self.output.partition_by:
            if "/" in p or "=" in p:
                raise ValueError(
                    f"output.partition_by names {p!r}, which contains {'/' if '/' in p else '='!r}: partition folders are '<column>=<value>', "
                    f"so it would nest folders and read back as None; partition by a column whose name has neither (e.g. 'label')"
                )
            if p not in cols:
                raise ValueError(
                    f"output.partition_by names {p!r}, which is not an output column; "
                    f"partition by one of {sorted(cols) or 'nothing yet: set input.label_feature or input.passthrough'}"
                )
        return self


def _format_validation_error(e: ValidationError, source: str) -> str:
    """Every problem pydantic found, one line each (a user fixes them all in one go)."""
    lines = list(dict.fromkeys(_format_one_error(err, source) for err in e.errors()))
    return "\n".join(lines)


def _format_one_error(err: dict, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    typ = err["type"]
    if typ == "extra_forbidden":
        parent_path = [p for p in err["loc"][:-1]]
        key = err["loc"][-1]
        model: type[BaseModel] = JobConfig
        for p in parent_path:
            if isinstance(p, int) or model is None:
                continue
            field = model.model_fields.get(str(p))
            ann = field.annotation if field else None
            model = _model_of(ann)
        known = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{source}: unknown key {loc!r}; {hint}known keys here: {', '.join(known)}"
    if typ == "missing":
        return f"{source}: required key {loc!r} is missing; add it (see configs/demo.yaml)"
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if typ == "value_error" and isinstance(value, dict):  # a rule across fields: its message names them
        return f"{source}: {msg}"
    return f"{source}: {loc} = {value!r} is invalid: {msg}"


def _model_of(ann):
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _model_of(a)
        if m is not None:
            return m
    return None


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 'null', '3', 'true', '[a, b]' all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a raw config dict (before validation)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} has no '='; write it as --set section.key=value, e.g. --set output.path=/tmp/out")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section; write --set section.key=value")
            node = nxt
        node[keys[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None) -> JobConfig:
    """Load, override and validate a config.

    Raises:
        ConfigError: with a one-line message naming the key, the value and the fix.
    """
    source = str(path) if path else "config"
    if raw is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as configs/demo.yaml")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping with input/model/layers/output sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def config_to_dict(cfg: JobConfig) -> dict:
    return cfg.model_dump(mode="json", by_alias=True)


# Output fields the application acts on (when to publish); workers never see them.
_APP_ONLY_OUTPUT = {"max_dead_letter_fraction"}


def to_spec(cfg: JobConfig):
    """The library's narrow, frozen view of a config (`layerbeam.transforms.shard.JobSpec`):
    what travels to workers."""
    from .transforms.formats import WriteSpec
    from .transforms.layers import SelectSpec
    from .transforms.models import ModelSpec
    from .transforms.readers import ReadSpec
    from .transforms.shard import BatchSpec, JobSpec

    layers = cfg.layers
    return JobSpec(
        input=ReadSpec(**cfg.input.model_dump()),
        model=ModelSpec(**cfg.model.model_dump()),
        layers=SelectSpec(
            select=tuple(s.model_dump(by_alias=True, exclude_none=True) for s in layers.select),
            exclude=layers.exclude,
            reduce=layers.reduce,
            dtype=layers.dtype,
            include_inputs=layers.include_inputs,
            max_bytes_per_example=layers.max_bytes_per_example,
        ),
        output=WriteSpec(**cfg.output.model_dump(exclude=_APP_ONLY_OUTPUT)),
        batching=BatchSpec(**cfg.batching.model_dump()),
    )
