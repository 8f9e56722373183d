"""Moonlight in miniature: a tiny MLA + sigmoid-routed MoE trained with Muon and with AdamW.

``python -m examples.demo`` trains the same model on the same bytes twice under DeepSpeed ZeRO-1,
once with ``"type": "Muon"`` and once with ``"type": "AdamW"`` (same lr and weight decay), then
writes a loss-vs-tokens plot and a table of final validation losses to the output directory.
"""
