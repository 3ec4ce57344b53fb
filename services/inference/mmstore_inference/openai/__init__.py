"""The OpenAI-compatible chat endpoints of the inference service, one module per concern:

``chat`` (routes and orchestration), ``prompt`` (offload, headers, render or bridge),
``sampling`` (OpenAI's parameters -> the service's), ``decoding`` (ids -> text, stop strings,
deltas), ``sse`` (streamed events), ``schemas`` (the wire format), ``errors`` (OpenAI's error shape
and the one translation of the service's errors).
"""

from .chat import OpenAIChat

__all__ = ["OpenAIChat"]
