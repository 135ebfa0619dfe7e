"""The DSL: ``Module``, ``Parameter``, layers and functions over traced tensors."""

from . import functional
from .layers import (
                     CrossEntropyLoss,
                     Decoder,
                     DecoderLayer,
                     Dropout,
                     Embedding,
                     Encoder,
                     EncoderLayer,
                     FeedForward,
                     LayerNorm,
                     LearnedPositionalEmbedding,
                     Linear,
                     MultiHeadAttention,
                     RMSNorm,
                     SinusoidalPositionalEncoding,
                     SwiGLU,
                     Transformer,
                     causal_mask,
                     sinusoidal_table,
)
from .module import Buffer, Module, ModuleList, Parameter
from .spec import InputSpec
from .tensor import Tensor, TraceError, trace

__all__ = ["functional", "CrossEntropyLoss", "Decoder", "DecoderLayer", "Dropout", "Embedding", "Encoder", "EncoderLayer",
           "FeedForward", "LayerNorm", "LearnedPositionalEmbedding", "Linear", "MultiHeadAttention", "RMSNorm",
           "SinusoidalPositionalEncoding", "SwiGLU", "Transformer", "causal_mask", "sinusoidal_table", "InputSpec", "Module",
           "ModuleList", "Parameter", "Buffer", "Tensor", "TraceError", "trace"]
