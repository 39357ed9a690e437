"""Uni-Perceiver: the text encoder, the shared decoder and the similarity readout of the generalist model."""
from .decoder import DecoderConfig, Modality, SharedDecoder
from .factory import create_model_and_transforms
from .image_encoder import ImageEncoder, ImageEncoderConfig
from .model import UniPerceiver, UniPerceiverConfig, tiny_config
from .processing import ImageProcessor
from .readout import SimilarityReadout
from .text_encoder import TextEncoder, TextEncoderConfig

__all__ = ["DecoderConfig", "ImageEncoder", "ImageEncoderConfig", "ImageProcessor", "Modality", "SharedDecoder",
           "SimilarityReadout", "TextEncoder", "TextEncoderConfig", "UniPerceiver", "UniPerceiverConfig", "create_model_and_transforms",
           "tiny_config"]
