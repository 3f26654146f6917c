"""Reference models and the model registry."""

from torchslim.models import lenet, onnx_graph, resnet, small  # noqa: F401  (registers the models)
from torchslim.models.registry import (
    create_model,
    factory_of,
    is_allowlisted,
    list_models,
    register_model,
)

__all__ = ["create_model", "factory_of", "is_allowlisted", "list_models", "register_model"]
