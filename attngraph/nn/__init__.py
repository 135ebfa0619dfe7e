"""The DSL: ``Module``, ``Parameter``, layers and functions over traced tensors."""

from . import functional
from .layers import (
                     Decoder,
                     DecoderLayer,
                     Embedding,
                     Encoder,
                     EncoderLayer,
                     FeedForward,
                     LayerNorm,
                     LearnedPositionalEmbedding,
                     Linear,
                     MultiHeadAttention,
                     SinusoidalPositionalEncoding,
                     causal_mask,
                     sinusoidal_table,
)
from .module import InputSpec, Module, ModuleList, Parameter
from .tensor import Tensor, TraceError, trace

__all__ = ["functional", "Decoder", "DecoderLayer", "Embedding", "Encoder", "EncoderLayer",
           "FeedForward", "LayerNorm", "LearnedPositionalEmbedding", "Linear", "MultiHeadAttention",
           "SinusoidalPositionalEncoding", "causal_mask", "sinusoidal_table", "InputSpec", "Module",
           "ModuleList", "Parameter", "Tensor", "TraceError", "trace"]
