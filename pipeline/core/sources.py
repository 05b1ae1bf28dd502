"""Where a run's model comes from, registered with the run folder (which imports none of this):

    registry   a built-in model by name (onnxpipe.models)
    factory    a user's factory, "my_pkg.my_module:build" or "file.py:build" (pipeline/core/byo.py)
    onnx       a graph imported by `onnxpipe import` (no PyTorch definition; inputs from the record)

`Run.spec_of(variant)` picks the kind from the manifest's model_source and calls the resolver here."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..runfolder import register_model_source


def registry_spec(name: str, source: dict | None):
    from ..models import UnknownModelError, get_model

    try:
        return get_model(name)
    except UnknownModelError as e:
        raise ConfigError(str(e)) from None


def factory_spec_of(name: str, source: dict):
    from .byo import spec_from_source

    return spec_from_source(source)


def imported_spec(name: str, source: dict):
    """A ModelSpec for an imported graph: no PyTorch builder, inputs and outputs from the record."""
    from ..models import InputSpec, ModelSpec

    from ..models.registry import guess_role

    inputs = []
    for i in source["inputs"]:
        role = i.get("role") or guess_role(i["name"], i["dtype"])   # records before roles were kept
        layout = i.get("layout") or (source.get("layout") if role == "data" and len(i["shape"]) == 3 else None)
        inputs.append(InputSpec(i["name"], tuple(i["shape"]), {int(a): n for a, n in i["dynamic"].items()}, i["dtype"],
                                role=role, layout=layout))
    config_cls = dataclasses.make_dataclass("ImportedConfig", [], frozen=True,
                                            namespace={"num_classes": source.get("num_classes")})

    def build(cfg):
        raise ConfigError(f"{name} was imported as ONNX: it has no PyTorch definition (stages that need one, "
                          "such as train or distill, do not apply)")

    return ModelSpec(name=name, family=source["family"], config_cls=config_cls, build=build, inputs=tuple(inputs),
                     output_names=tuple(source["outputs"]), opset=source.get("opset", 18),
                     description=f"imported ONNX model {source.get('file', '')}", source=source)


register_model_source("registry", registry_spec)
register_model_source("factory", factory_spec_of)
register_model_source("onnx", imported_spec)
