"""Layout adapters: from an image's size alone, the exact grid and placeholder tokens of a
model family's HuggingFace processor. See :mod:`mmstore_client.layouts.base` for the contract.

Importing this package imports every family module, which registers its adapter in
:mod:`mmstore_client.layouts.registry`.
"""

from mmstore_client.layouts.base import (
    Layout,
    LayoutConfig,
    LayoutConfigError,
    LayoutRefusal,
    Placement,
)
from mmstore_client.layouts.gemma3 import Gemma3Config, Gemma3Layout
from mmstore_client.layouts.glm4v import Glm4vConfig, Glm4vLayout
from mmstore_client.layouts.idefics3 import Idefics3Config, Idefics3Layout
from mmstore_client.layouts.kimi_k25 import KimiK25Config, KimiK25Layout
from mmstore_client.layouts.llava_onevision import LlavaOnevisionConfig, LlavaOnevisionLayout
from mmstore_client.layouts.qwen2_vl import Qwen2VLConfig, Qwen2VLLayout
from mmstore_client.layouts.qwen3_vl import Qwen3VLConfig, Qwen3VLLayout
from mmstore_client.layouts.registry import (
    from_config,
    from_pretrained,
    known_model_types,
    layout_class,
)

__all__ = [
    "Gemma3Config",
    "Gemma3Layout",
    "Glm4vConfig",
    "Glm4vLayout",
    "Idefics3Config",
    "Idefics3Layout",
    "KimiK25Config",
    "KimiK25Layout",
    "Layout",
    "LayoutConfig",
    "LayoutConfigError",
    "LayoutRefusal",
    "LlavaOnevisionConfig",
    "LlavaOnevisionLayout",
    "Placement",
    "Qwen2VLConfig",
    "Qwen2VLLayout",
    "Qwen3VLConfig",
    "Qwen3VLLayout",
    "from_config",
    "from_pretrained",
    "known_model_types",
    "layout_class",
]
