"""Examples for muon-ds: the demo (``python -m examples.demo``), DeepSpeed, Hugging Face and Slurm launches."""
