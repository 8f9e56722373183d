"""muon-ds: Moonlight's Muon optimizer for DeepSpeed (ZeRO 0-3) and Megatron-core.

Importing the package makes ``"optimizer": {"type": "Muon"}`` in a DeepSpeed config build
:class:`muon_ds.optim.Muon`: DeepSpeed is patched now if it is already imported, or as soon
as it is imported later (so importing muon_ds never imports DeepSpeed by itself).
"""

__version__ = "0.1.0"

from muon_ds.activation import activate_deepspeed_on_import as _activate

_activate()
