"""archgen: a compiler from declarative specs of hybrid neural architectures to PyTorch packages.

The pipeline, one package per stage:
    spec     YAML text  -> Spec           (pydantic models, source positions, presets, overrides)
    resolve  Spec       -> ResolvedSpec   (derived sizes filled in, layout expanded to one entry per layer)
    ir       ResolvedSpec -> IR graph     (networkx DiGraph of typed ops with symbolic shapes)
    passes   IR -> IR                     (shape inference, validation, cost model)
    emit     IR -> generated/<name>/      (jinja2 templates + runtime ops)
    export   generated package -> .pt2 / .onnx
"""

__version__ = "0.1.0"
