"""Config validation and overrides: unknown keys, types, --set."""

from __future__ import annotations

import pytest

from layerbeam.config import ConfigError, apply_overrides, load_config
from tests.conftest import base_config


def test_valid_config_gets_defaults():
    cfg = load_config(raw=base_config("data/*.tfrecord", "/tmp/out"))
    assert cfg.batching.batch_size == 4
    assert cfg.layers.reduce == "mean" and cfg.layers.dtype == "float32"
    assert cfg.layers.select[0].layer == "block_1_expand_relu"
    assert cfg.output.compression == "zstd"


def test_unknown_key_is_rejected_with_a_suggestion():
    raw = base_config("data/*.tfrecord", "/tmp/out")
    raw["output"]["pathh"] = "x"
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    msg = str(e.value)
    assert "unknown key 'output.pathh'" in msg and "did you mean 'path'" in msg
    assert "\n" not in msg


def test_bad_type_names_key_and_value():
    raw = base_config("data/*.tfrecord", "/tmp/out", **{"batching.batch_size": "many"})
    with pytest.raises(ConfigError, match=r"batching.batch_size = 'many' is invalid"):
        load_config(raw=raw)


def test_bad_reduce_value_is_rejected():
    raw = base_config("x", "/tmp/out")
    raw["layers"]["select"] = [{"layer": "conv", "reduce": "median"}]
    with pytest.raises(ConfigError, match="median"):
        load_config(raw=raw)


def test_set_overrides_parse_yaml_scalars_and_create_sections():
    raw = apply_overrides(base_config("x", "/o"), ["output.path=/tmp/new", "batching.batch_size=8", "output.partition_by=[label]", "model.weights=null"])
    cfg = load_config(raw=raw)
    assert cfg.output.path == "/tmp/new"
    assert cfg.batching.batch_size == 8
    assert cfg.output.partition_by == ("label",)
    assert cfg.model.weights is None


def test_set_without_equals_is_a_one_line_error():
    with pytest.raises(ConfigError, match="has no '='"):
        apply_overrides({}, ["output.path"])


def test_partition_column_must_exist():
    raw = base_config("x", "/o", **{"output.partition_by": ["colour"]})
    with pytest.raises(ConfigError, match="'colour', which is not an output column"):
        load_config(raw=raw)


def test_layer_strings_and_mappings_mix():
    raw = base_config("x", "/o")
    raw["layers"]["select"] = ["a", {"layer": "b", "as": "bee", "reduce": "none", "dtype": "float16"}]
    cfg = load_config(raw=raw)
    assert [s.layer for s in cfg.layers.select] == ["a", "b"]
    assert cfg.layers.select[1].name == "bee" and cfg.layers.select[1].dtype == "float16"


def test_demo_config_is_valid():
    cfg = load_config("configs/demo.yaml")
    assert cfg.model.source == "keras.applications.MobileNetV2"
    assert len(cfg.layers.select) == 5


def test_image_folders_take_no_feature_settings():
    raw = base_config("photos/**", "/o", **{"input.format": "images", "input.passthrough": {"id": "int64"}})
    raw["input"].pop("key_feature")
    raw["input"].pop("label_feature")
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    assert str(e.value) == (
        "config: input.passthrough is set, but input.format 'images' reads plain image files, which have no features "
        "(the key is the file path and the label the folder name); remove it or write TFRecord examples"
    )
