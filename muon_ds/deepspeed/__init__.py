"""DeepSpeed adapter: ``"optimizer": {"type": "Muon"}`` builds :class:`muon_ds.optim.Muon` under ZeRO 0-3."""
