"""Load a model from any source, fingerprint its weights, and the image preprocessing
functions. Plain Keras: no Beam, no config objects."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._fs import local_copy
from .errors import ModelError, first_line

__all__ = ["ModelSpec", "LauncherModel", "offer_launcher_model", "withdraw_launcher_model", "launcher_model_offered", "launcher_model", "load_model", "resolve_model", "custom_objects", "model_fingerprint", "preprocess_fn", "describe_preprocess", "PREPROCESS_CHOICES"]

PREPROCESS_CHOICES = "none, scale, tf, caffe, torch or module:function"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to build (see `layerbeam.config.ModelConfig` for each field)."""

    source: str
    weights: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    seed: int = 0
    safe_mode: bool = True
    custom_objects: tuple[str, ...] | Mapping[str, str] = ()


@dataclasses.dataclass
class LauncherModel:
    """A model the launcher loaded for its checks, as a worker in the same process may
    take it: with its fingerprint, the Keras dtype policy it was built under, the device
    its variables were placed on (TensorFlow's default then; None where no worker asks),
    and what the launcher traced for its checks, as the taker reads it back. `release()`
    lets the launcher's reference go once no in-process worker can want it."""

    model: Any
    fingerprint: str
    policy: str
    device: str | None = None
    traced: tuple | None = None

    def release(self) -> None:
        self.model = None
        self.traced = None

    @classmethod
    def capture(cls, model, fingerprint: str, traced: tuple | None = None, placed: bool = True) -> LauncherModel:
        """The model under the dtype policy in force; with `placed`, the device TensorFlow
        placed it on (the first the device plan gives)."""
        import keras

        device = None
        if placed:
            from .devices import discover_gpus, plan_devices

            device = plan_devices(discover_gpus()).devices[0]
        return cls(model, fingerprint, keras.mixed_precision.global_policy().name, device, traced)


# The launcher's models, by key (the file path's run id, an `ExtractLayers`' own key). An
# in-process runner (DirectRunner's FnApiRunner in in_memory or multi_threading mode, a
# LOOPBACK portable runner) runs the worker in the launcher's own process, where loading
# and tracing the model a second time only costs start-up time (1 s for ResNet50).
# Workers in other processes find this empty and load their own.
_LAUNCHER_MODELS: dict[str, LauncherModel] = {}


def offer_launcher_model(key: str, model: LauncherModel | None) -> None:
    """Until `withdraw_launcher_model(key)`, a worker in this process that asks for `key`
    takes `model` instead of loading one, if it runs under the same dtype policy."""
    if model is not None and model.model is not None:
        _LAUNCHER_MODELS[key] = model


def withdraw_launcher_model(key: str) -> None:
    _LAUNCHER_MODELS.pop(key, None)


@contextlib.contextmanager
def launcher_model_offered(key: str, model: LauncherModel | None):
    """`model` offered under `key` while the block runs."""
    offer_launcher_model(key, model)
    try:
        yield
    finally:
        withdraw_launcher_model(key)


def launcher_model(key: str | None) -> LauncherModel | None:
    """The launcher's model offered under `key`, if this process has it and it was built
    under the dtype policy in force here (a worker's `batching.precision`)."""
    import keras

    entry = _LAUNCHER_MODELS.get(key) if key else None
    return entry if entry is not None and entry.policy == keras.mixed_precision.global_policy().name else None


def load_model(cfg) -> Any:
    """Load the model a `ModelConfig` names.

    Sources: `keras.applications.<Name>` (weights null → random, seeded by `cfg.seed`, so
    every worker builds the same weights), a `.keras` file (safe mode unless
    `cfg.safe_mode` is false), a legacy `.h5` file, or `module:function`.

    Raises:
        ModelError: with the source, the cause and the fix.
    """
    import keras

    src = cfg.source
    objects = custom_objects(cfg.custom_objects)
    keras.utils.set_random_seed(cfg.seed)
    with keras.saving.custom_object_scope(objects):
        return _load(cfg, src, objects)


def custom_objects(spec) -> dict[str, Any]:
    """Import what `model.custom_objects` names: a list of modules (their
    `register_keras_serializable` classes register themselves on import) or
    `{Name: "module:attr"}`; returns the name → object mapping (empty for modules).

    Raises:
        ModelError: a module or attribute cannot be imported.
    """
    out: dict[str, Any] = {}
    items = spec.items() if isinstance(spec, Mapping) else ((None, m) for m in spec)
    for name, target in items:
        module_name, _, attr = str(target).partition(":")
        try:
            obj = importlib.import_module(module_name)
            if attr:
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as e:
            raise ModelError(
                f"model.custom_objects {target!r}: cannot import it ({first_line(e)}); "
                "make the module importable on the launcher and the workers (pip install it or add it to PYTHONPATH)"
            ) from None
        if name is not None:
            out[str(name)] = obj
    return out


def _unknown_class(msg: str) -> str | None:
    """The class name in Keras's 'could not locate class' deserialization errors."""
    import re

    m = re.search(r"(?:Could not locate (?:class|function)|Unknown (?:layer|object|class)(?: type)?:?)\s*'?([A-Za-z_][\w.>]*)'?", msg)
    return m.group(1) if m else None


def _load(cfg, src: str, objects: Mapping[str, Any]):
    import keras

    if src.startswith("keras.applications."):
        name = src.split(".", 2)[2]
        fn = getattr(keras.applications, name, None)
        if fn is None or not callable(fn):
            known = [n for n in dir(keras.applications) if n[:1].isupper()]
            close = difflib.get_close_matches(name, known, n=3)
            raise ModelError(
                f"model.source {src!r}: keras.applications has no {name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}")
            )
        kwargs = dict(cfg.kwargs)
        kwargs.setdefault("weights", cfg.weights)
        if cfg.input_shape is not None:
            kwargs.setdefault("input_shape", tuple(cfg.input_shape))
        try:
            return fn(**kwargs)
        except (ValueError, TypeError) as e:
            raise ModelError(f"model.source {src!r} with {kwargs}: {first_line(e)}") from None
    if ":" in src and not src.endswith((".keras", ".h5", ".hdf5")) and "://" not in src:
        module_name, _, fn_name = src.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelError(
                f"model.source {src!r}: cannot import {fn_name!r} from {module_name!r} ({first_line(e)}); "
                "make the module importable (pip install it or add it to PYTHONPATH)"
            ) from None
        model = fn(**cfg.kwargs)
        if not isinstance(model, keras.Model):
            raise ModelError(f"model.source {src!r} returned {type(model).__name__}, not a keras.Model; return the model from the factory")
        return model
    if src.endswith((".keras", ".h5", ".hdf5")):
        try:
            local = local_copy(src)
        except FileNotFoundError:
            local = src
        import os

        if "://" not in local and not os.path.isfile(local):
            raise ModelError(f"model.source {src!r} does not exist; give the path of a saved model file") from None
        if "://" not in local:
            import zipfile

            is_keras = src.endswith(".keras")
            ok = zipfile.is_zipfile(local) if is_keras else _is_hdf5(local)
            if not ok:
                kind = "a .keras file (a zip archive)" if is_keras else "an HDF5 file"
                raise ModelError(f"model.source {src!r} is not {kind}, so not a saved Keras model; give a file written by model.save({'m.keras' if is_keras else 'm.h5'!r})")
        unsafe = _h5_python_lambdas(local) if cfg.safe_mode and not src.endswith(".keras") else []
        if unsafe:
            # Keras 3.15's legacy h5 loader refuses these in safe mode too; checking the
            # config first keeps that rule whatever Keras version loads the file.
            raise ModelError(
                f"model.source {src!r} contains Lambda layer(s) {unsafe[:3]} with Python code, which safe mode refuses; "
                "if you trust this file set model.safe_mode=false (or pass --unsafe-model)"
            )
        try:
            return keras.saving.load_model(local, compile=False, safe_mode=cfg.safe_mode, custom_objects=dict(objects) or None)
        except FileNotFoundError:
            raise ModelError(f"model.source {src!r} does not exist; give the path of a saved model file") from None
        except Exception as e:  # Keras raises several types for unsafe or corrupt files
            msg = first_line(e)
            cls = _unknown_class(str(e))
            if cls:
                raise ModelError(
                    f"model.source {src!r} uses the class {cls!r}, which is not registered; name the module that defines it "
                    f"in model.custom_objects (e.g. [my_package.layers]) or map it: {{{cls}: 'module:attr'}}"
                ) from None
            if "safe_mode" in msg or "Lambda" in msg or "lambda" in msg:
                raise ModelError(
                    f"model.source {src!r} contains a Lambda layer with Python code, which safe mode refuses; "
                    "if you trust this file set model.safe_mode=false (or pass --unsafe-model)"
                ) from None
            raise ModelError(f"model.source {src!r} is not a loadable Keras model: {msg}") from None
    raise ModelError(
        f"model.source {src!r} is not a model source; use a .keras/.h5 file, "
        "'keras.applications.<Name>' or 'module:function'"
    )


def resolve_model(model, *, input_shape=None, weights: str | None = None, kwargs: Mapping[str, Any] | None = None, seed: int = 0, safe_mode: bool = True):
    """A model given the ways the Python API accepts it → (keras.Model, its `ModelSpec` or
    None for an in-memory model, the input shapes to trace it at or None for its own).

    Args:
        model: a `keras.Model`, a `ModelSpec`, or a source (`.keras`/`.h5` path,
            `keras.applications.<Name>`, `module:function`).
        input_shape: one shape without the batch axis, or one per model input.
            `keras.applications` models are built at it; other models are traced at it.

    Raises:
        ModelError: the model is none of these, or cannot be loaded.
    """
    import os

    import keras

    shapes = None
    if input_shape is not None:
        items = list(input_shape)
        shapes = [tuple(int(d) for d in s) for s in items] if items and isinstance(items[0], (list, tuple)) else [tuple(int(d) for d in items)]
    if isinstance(model, keras.Model):
        return model, None, shapes
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        is_app = source.startswith("keras.applications.")
        spec = ModelSpec(
            source=source, weights=weights, kwargs=dict(kwargs or {}),
            input_shape=shapes[0] if is_app and shapes else None, seed=seed, safe_mode=safe_mode,
        )
        if is_app:
            shapes = None  # built at that shape already
    else:
        raise ModelError(
            f"model {model!r} is a {type(model).__name__}, not a model; give a keras.Model, a .keras/.h5 path, "
            "'keras.applications.<Name>' or 'module:function'"
        )
    return load_model(spec), spec, shapes


def _is_hdf5(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _h5_python_lambdas(path: str) -> list[str]:
    """Names of Lambda layers in a legacy .h5 model config whose function is Python code
    (Keras 3 `__lambda__` bytecode or a Keras 2 `function_type: lambda`); [] if none or the
    file is not an h5 model (the loader reports that)."""
    import json

    try:
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except (OSError, ImportError):
        return []
    if raw is None:
        return []
    try:
        config = json.loads(raw.decode() if hasattr(raw, "decode") else raw)
    except ValueError:
        return []
    found: list[str] = []

    def visit(node) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda" and isinstance(node.get("config"), dict):
                c = node["config"]
                fn = c.get("function")
                code = (isinstance(fn, dict) and fn.get("class_name") == "__lambda__") or c.get("function_type") == "lambda"
                if code:
                    found.append(str(c.get("name", "?")))
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(config)
    return found


def model_fingerprint(model) -> str:
    """A sha256 over the model's architecture and weights (what 'built from what' means)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    for w in model.weights:
        h.update(w.path.encode() if hasattr(w, "path") else w.name.encode())
        a = np.ascontiguousarray(np.asarray(w))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def preprocess_fn(name: str, model_source: str):
    """The image preprocessing, as a function of float32 tensors 0..255 (run inside tf.data)."""
    import keras

    if name == "auto":
        if model_source.startswith("keras.applications."):
            fn = getattr(keras.applications, model_source.split(".", 2)[2])
            mod = importlib.import_module(fn.__module__)
            return getattr(mod, "preprocess_input")
        # Raw 0..255 pixels into a model trained on other values give plausible-looking,
        # wrong outputs: the user says which scaling the model expects.
        raise ModelError(
            f"input.preprocess 'auto' knows the preprocessing of keras.applications models only, and {model_source!r} is not one; "
            f"set input.preprocess to the one the model was trained with: {PREPROCESS_CHOICES}"
        )
    if name == "none":
        return lambda x: x
    if name == "scale":
        return lambda x: x / 255.0
    if name in ("tf", "caffe", "torch"):
        from keras.applications import imagenet_utils

        return lambda x: imagenet_utils.preprocess_input(x, mode=name)
    if ":" in name:
        module_name, _, fn_name = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelError(f"input.preprocess {name!r}: cannot import it ({first_line(e)})") from None
    raise ModelError(f"input.preprocess {name!r} is unknown; use auto, none, scale, tf, caffe, torch or module:function")


def describe_preprocess(name: str, model_source: str) -> str:
    """What `preprocess_fn(name, model_source)` does, in words (for the size plan)."""
    if name == "auto" and model_source.startswith("keras.applications."):
        return f"auto: {model_source.split('.', 2)[2]}'s preprocess_input"
    return {
        "none": "none (float 0..255)",
        "scale": "scale (x/255, 0..1)",
        "tf": "tf (-1..1)",
        "caffe": "caffe (BGR, ImageNet means subtracted)",
        "torch": "torch (0..1, ImageNet mean/std)",
    }.get(name, name)
