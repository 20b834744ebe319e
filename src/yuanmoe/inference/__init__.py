"""Generation: cached batched decoding, sampling, streaming text, the official chat format."""

from .chat import format_chat
from .engine import Request, TextEvent, complete, encode_prompt, run_requests, stream
from .generate import BatchDecoder, decode_tokens, generate
from .quantize import quantize_int8
from .sampling import SamplingParams
from .text import IncrementalDetokenizer, TextStream

__all__ = ["BatchDecoder", "IncrementalDetokenizer", "Request", "SamplingParams", "TextEvent", "TextStream",
           "complete", "decode_tokens", "encode_prompt", "format_chat", "generate", "quantize_int8", "run_requests",
           "stream"]
