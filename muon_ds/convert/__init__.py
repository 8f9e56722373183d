"""Lossless HF <-> Megatron checkpoint conversion for Moonlight, and its verification."""
