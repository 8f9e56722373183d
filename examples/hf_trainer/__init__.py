"""A plain Hugging Face Trainer script: Muon comes from ``--deepspeed ds_muon_zero1.json`` alone."""
