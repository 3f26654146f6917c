"""The ``.slim`` artifact: save/load of a model as one safetensors file with a JSON manifest.

The implementation is in :mod:`torchslim.artifact.slim` (save, load, manifests), :mod:`~torchslim.artifact.codecs`
(module codecs), :mod:`~torchslim.artifact.encodings` (dense/bitmask/coo/deflate tensors) and
:mod:`~torchslim.artifact.io` (header parsing, manifest validation); this file re-exports the public names.
"""

from torchslim.artifact.codecs import register_module_codec
from torchslim.artifact.encodings import ENCODINGS
from torchslim.artifact.io import FORMAT_VERSION
from torchslim.artifact.slim import (
    RUNTIMES,
    input_signature,
    load,
    read_manifest,
    register_load_hook,
    save,
    tensor_table,
)

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "RUNTIMES",
    "input_signature",
    "load",
    "read_manifest",
    "register_load_hook",
    "register_module_codec",
    "save",
    "tensor_table",
]
