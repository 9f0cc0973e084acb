"""Per-iteration adapters (model.adapter): the registry, with each kind's parameter and FLOP counts.

Pure python, so the FLOP accountant and config validation read it without importing Flax;
the nnx class that implements a kind (asura.model.adapters) is imported when a model is built.
Counts are per adapted linear map x @ W with W [fan_in, fan_out], for one iteration slot:

  lora  ΔW = γ·U V, U [in, r], V [r, out]:           r·(in+out) params, 2·r·(in+out) FLOPs/token
  abba  ΔW = γ·(U1 V1) ⊙ (U2 V2) via Khatri–Rao:     (r1+r2)·(in+out) params,
        x @ U_kr [in, r1·r2] then @ V_kr [r1·r2, out]: 2·r1·r2·(in+out) FLOPs/token
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asura.registry import Registry

if TYPE_CHECKING:
    from asura.config.schema import ModelConfig

Count = Callable[["ModelConfig", int, int], int]  # (model cfg, fan_in, fan_out) -> count


@dataclass(frozen=True)
class AdapterKind:
    doc: str
    params: Count
    flops: Count  # forward FLOPs per token
    impl: str | None  # "module:Class" of the nnx implementation; None = no adapter


ADAPTERS: Registry[AdapterKind] = Registry("model.adapter", "per-iteration relaxation of the shared linear maps")
ADAPTERS.add(
    "none", AdapterKind("no adapter: iterations share every weight", lambda m, i, o: 0, lambda m, i, o: 0, None)
)
ADAPTERS.add(
    "lora",
    AdapterKind(
        "ΔW[t] = γ·U V (rank model.adapter_rank)",
        params=lambda m, i, o: m.adapter_rank * (i + o),
        flops=lambda m, i, o: 2 * m.adapter_rank * (i + o),
        impl="asura.model.adapters:LoRA",
    ),
)
ADAPTERS.add(
    "abba",
    AdapterKind(
        "ΔW[t] = γ·(U1 V1) ⊙ (U2 V2), rank <= adapter_rank·adapter_rank2, applied in Khatri–Rao form",
        params=lambda m, i, o: (m.adapter_rank + m.adapter_rank2) * (i + o),
        flops=lambda m, i, o: 2 * m.adapter_rank * m.adapter_rank2 * (i + o),
        impl="asura.model.adapters:ABBA",
    ),
)
