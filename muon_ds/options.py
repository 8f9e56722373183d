"""The validated options of Moonlight's Muon, shared by the DeepSpeed and Megatron adapters."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, field_validator

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _not_bool(value: Any) -> Any:
    """pydantic's lax mode reads True as 1: a boolean where a number belongs is a mistake, not a value."""
    if isinstance(value, bool):
        raise ValueError(f"a number is required, got the boolean {value}")
    return value


Real = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Count = Annotated[int, BeforeValidator(_not_bool)]


class MuonOptions(BaseModel):
    """Muon's hyper-parameters, AdamW's lr and weight decay carrying over (Moonlight defaults).

    The same keys may be given per param group; each group's merged options are validated too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: Real = Field(1e-3, ge=0)
    weight_decay: Real = Field(0.0, ge=0)
    momentum: Real = Field(0.95, ge=0, lt=1)
    nesterov: StrictBool = True
    ns_steps: Count = Field(5, ge=1)
    betas: tuple[Real, Real] = (0.9, 0.95)
    eps: Real = Field(1e-8, gt=0)
    scale: Literal["moonlight", "shape_scaling", "none"] = "moonlight"
    extra_scale: Real = Field(1.0, gt=0)  # a factor on top of ``scale`` (Megatron's --muon-extra-scale-factor)
    ns_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    ns_coefficients: Literal["moonlight", "polar_express"] = "moonlight"  # see muon_ds/newton_schulz.py
    ns_method: Literal["direct", "gram"] = "direct"  # "gram": the same iteration in Gram space
    ns_compile: StrictBool = False  # Newton-Schulz through torch.compile (muon_ds/compiled_ns.py)
    muon_lr: Optional[Real] = Field(None, ge=0)
    adam_lr: Optional[Real] = Field(None, ge=0)

    @field_validator("scale", mode="before")
    @classmethod
    def _scale_not_spectral(cls, scale: Any) -> Any:
        if scale == "spectral":  # one meaning per word: Megatron-LM's "spectral" is sqrt(max(A, B))
            raise ValueError("'spectral' is not a muon_ds scale: sqrt(max(1, A / B)) is 'shape_scaling' (as in "
                             "Megatron-LM, whose 'spectral' is sqrt(max(A, B)), i.e. 'moonlight' / 0.2)")
        return scale

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    @property
    def torch_ns_dtype(self) -> torch.dtype:
        return NS_DTYPES[self.ns_dtype]

    def lr_ratio(self, use_muon: bool) -> float:
        """How the side's lr relates to ``lr``: schedulers set ``lr``, the override scales with it."""
        override = self.muon_lr if use_muon else self.adam_lr
        if override is None:
            return 1.0
        if self.lr == 0:
            raise ValueError("muon_lr / adam_lr need a non-zero lr: they are applied as a ratio to lr, "
                             "so that an lr scheduler drives both sides")
        return override / self.lr

    @classmethod
    def parse(cls, params: dict[str, Any], where: str = "Muon optimizer params") -> "MuonOptions":
        """Validate user options, naming the offending key and listing the valid ones."""
        unknown = sorted(set(params) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(cls.model_fields)}")
        try:
            return cls(**params)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
            raise ValueError(f"{where}: {problems}") from None
