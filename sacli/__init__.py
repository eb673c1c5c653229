"""sacli: long-document LLM inference with SampleAttention sparse prefill."""

__version__ = "0.1.0"
