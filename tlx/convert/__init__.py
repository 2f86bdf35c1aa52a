"""Weights from other frameworks: strict PyTorch -> tlx converters and pretrained backbones by name.

Nothing here imports torch until a .pth file has to be read (`read_torch_file`).
"""

from tlx.convert.pretrained import (
    SOURCES,
    find_weights,
    load_pretrained,
    normalization,
)
from tlx.convert.torch_to_flax import (
    NAME_MAPS,
    ConversionError,
    convert,
    read_torch_file,
)

__all__ = [
    "NAME_MAPS",
    "SOURCES",
    "ConversionError",
    "convert",
    "find_weights",
    "load_pretrained",
    "normalization",
    "read_torch_file",
]
