"""layerbeam: any Keras model's intermediate layer outputs, for every example of a sharded
dataset, written to partitioned Parquet or TFRecord with Apache Beam.

The public API. Importing `layerbeam` imports neither TensorFlow nor Beam: each name is
loaded on first use.

    >>> import layerbeam
    >>> layerbeam.list_layers(model)                       # what can be tapped
    >>> table = layerbeam.extract(model, images, select=["block_*_relu"])   # pyarrow.Table
    >>> manifest = layerbeam.run("configs/demo.yaml")     # the CLI's job, from Python
    >>> table = layerbeam.read("out/demo")                # any output, back as pyarrow

Beam users apply `layerbeam.ExtractLayers(...)` to their own PCollections (encoded images
first through `layerbeam.DecodeImages(...)`) and write with `layerbeam.WriteLayers(...)`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .transforms.errors import CommitError, ConfigError, LayerbeamError, ModelError, OutputError, SelectionError

__all__ = [
    "list_layers",
    "extract",
    "run",
    "read",
    "to_pandas",
    "to_tf_dataset",
    "arrow_dataset",
    "open_output",
    "ExtractLayers",
    "DecodeImages",
    "WriteLayers",
    "load_config",
    "LayerbeamError",
    "ConfigError",
    "ModelError",
    "SelectionError",
    "OutputError",
    "CommitError",
]

# name → (module relative to this package, attribute)
_LAZY = {
    "list_layers": (".extract", "list_layers"),
    "extract": (".extract", "extract"),
    "run": (".run", "run"),
    "read": (".transforms.readback", "to_arrow"),
    "to_pandas": (".transforms.readback", "to_pandas"),
    "to_tf_dataset": (".transforms.readback", "to_tf_dataset"),
    "arrow_dataset": (".transforms.readback", "arrow_dataset"),
    "open_output": (".transforms.readback", "open_output"),
    "ExtractLayers": (".transforms.beam", "ExtractLayers"),
    "DecodeImages": (".transforms.beam", "DecodeImages"),
    "WriteLayers": (".transforms.beam", "WriteLayers"),
    "load_config": (".config", "load_config"),
}


# `run` and `extract` are API functions and also the submodules that define them. The
# import system sets a submodule as an attribute of its package when it first loads it
# (`from layerbeam.run import run_job` does), which would hide the function; the package
# keeps such a submodule in sys.modules only. `from layerbeam.run import run_job` works.
_SHADOWED = frozenset(n for n, (module, _) in _LAZY.items() if module == "." + n)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'layerbeam' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
