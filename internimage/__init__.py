"""InternImage: the DCNv3 backbone, its released variants and official-checkpoint loading."""
from .dcnv3 import DCNv3
from .model import InternImage, InternImageBlock, InternImageLayer
from .registry import PARAM_COUNTS, VARIANTS, create_model, list_models, model_config

__all__ = ["DCNv3", "InternImage", "InternImageBlock", "InternImageLayer", "PARAM_COUNTS", "VARIANTS",
           "create_model", "list_models", "model_config"]
