"""Moonlight (DeepSeek-V3) in megatron-core: HF config mapping (``config``) and layer specs (``spec``).

``config`` needs no megatron-core until a TransformerConfig is built; ``spec`` and ``local_layers``
import megatron-core.
"""
