"""The parameter-name table: asura's NNX attribute paths <-> stable Hugging Face tensor names.

Names are Llama's where Llama has the tensor (model.embed_tokens, model.layers.{i}.self_attn.q_proj,
model.layers.{i}.mlp.gate_proj, model.norm, lm_head; Qwen3's q_norm/k_norm), so a vanilla config's
tensors are a stock Llama/Qwen3 checkpoint as they stand. The looped model's own tensors follow the
same torch module layout (asura/io/hf/modeling_asura.py's modules carry exactly these names):

    w_proj [M, 2D, D]          model.inject.{t}.weight [D, 2D]
    post_norm, iter_norm [M, D] model.post_norm.{t}.weight / .bias, model.iter_norm.{t}.weight / .bias
    <linear>.adapter.* [M, ...] <linear>.adapters.{t}.lora_A.weight [r, in], .lora_B.weight [out, r]
                                (ABBA: .A1/.A2.weight [r, in], .B1/.B2.weight [out, r], ΔW = (B1 A1) ⊙ (B2 A2))
    w_gate [D], b_gate [1]      model.exit_gate.weight [1, D], model.exit_gate.bias [1]

Per-iteration stacks (a leading [max_iterations] axis) become one tensor per iteration t, and
matrices stored for x @ W [in, out] become torch's Linear layout [out, in]. Every transform is a
transpose, a reshape or a stack, so a round trip is bit-exact. Pure numpy: no JAX, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# asura module attribute -> torch module name (Llama's where one exists)
MODULES = {
    "blocks": "model.layers",
    "attn": "self_attn",
    "mlp": "mlp",
    "ln1": "input_layernorm",
    "ln2": "post_attention_layernorm",
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "up": "up_proj",
    "gate": "gate_proj",
    "down": "down_proj",
    "q_norm": "q_norm",
    "k_norm": "k_norm",
    "final_norm": "model.norm",
    "post_norm": "model.post_norm",
    "iter_norm": "model.iter_norm",
    "adapter": "adapters",
}
# modules whose parameters carry the leading [max_iterations] axis: one torch module per iteration
PER_ITERATION = frozenset({"post_norm", "iter_norm", "adapter", "w_proj"})


@dataclass(frozen=True)
class Leaf:
    name: str  # the tensor's name inside its torch module
    layout: str  # same | linear (x @ W [in, out] -> torch [out, in]) | row ([D] -> Linear(D, 1)'s [1, D])


LEAVES = {
    "scale": Leaf("weight", "same"),
    "bias": Leaf("bias", "same"),
    "kernel": Leaf("weight", "linear"),
    "u": Leaf("lora_A.weight", "linear"),  # LoRA ΔW = γ·U V: U [in, r] is PEFT's lora_A [r, in]
    "v": Leaf("lora_B.weight", "linear"),
    "u1": Leaf("A1.weight", "linear"),
    "u2": Leaf("A2.weight", "linear"),
    "v1": Leaf("B1.weight", "linear"),
    "v2": Leaf("B2.weight", "linear"),
}
# parameters held by LoopedLM itself: (torch module, leaf)
TOP = {
    "embed": ("model.embed_tokens", Leaf("weight", "same")),
    "unembed": ("lm_head", Leaf("weight", "linear")),
    "w_proj": ("model.inject", Leaf("weight", "linear")),
    "w_gate": ("model.exit_gate", Leaf("weight", "row")),
    "b_gate": ("model.exit_gate", Leaf("bias", "same")),
}


class NameTableError(ValueError):
    """A parameter path the table does not know, or tensors that do not fit the model; one line."""


Path = tuple  # an NNX parameter path, e.g. ("blocks", 0, "attn", "q", "kernel")


@dataclass(frozen=True)
class Entry:
    module: str  # torch module path, e.g. model.layers.0.self_attn.q_proj.adapters
    leaf: Leaf
    per_iteration: bool

    def name(self, t: int | None = None) -> str:
        return f"{self.module}.{t}.{self.leaf.name}" if self.per_iteration else f"{self.module}.{self.leaf.name}"


def entry(path: Path) -> Entry:
    """The table's entry for one NNX parameter path."""
    keys = [str(k) for k in path]
    if len(keys) == 1 and keys[0] in TOP:
        module, leaf = TOP[keys[0]]
        return Entry(module, leaf, keys[0] in PER_ITERATION)
    *mods, last = keys
    if last not in LEAVES or not mods:
        raise NameTableError(f"parameter {'/'.join(keys)} has no stable name (asura.io.names: add it to the table)")
    parts = []
    for i, m in enumerate(mods):
        if m.isdigit() and i > 0 and mods[i - 1] == "blocks":
            parts.append(m)
        elif m in MODULES:
            parts.append(MODULES[m])
        else:
            raise NameTableError(f"parameter {'/'.join(keys)}: module {m!r} has no stable name (asura.io.names)")
    return Entry(".".join(parts), LEAVES[last], any(m in PER_ITERATION for m in mods))


def _to_torch(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return np.ascontiguousarray(np.swapaxes(x, -1, -2))
    if layout == "row":
        return x.reshape(1, -1)
    return x


def _from_torch(x: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    y = np.ascontiguousarray(np.swapaxes(x, -1, -2)) if layout == "linear" else x
    return y.reshape(shape)


def to_hf(flat: dict[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """{stable name: tensor in torch layout} from {NNX path: array}; per-iteration stacks unstacked."""
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        e, x = entry(path), np.asarray(value)
        slices = [(t, x[t]) for t in range(x.shape[0])] if e.per_iteration else [(None, x)]
        for t, x_t in slices:
            out[e.name(t)] = _to_torch(x_t, e.leaf.layout)
    return out


def from_hf(
    tensors: dict[str, np.ndarray], like: dict[Path, tuple[tuple[int, ...], np.dtype]]
) -> dict[Path, np.ndarray]:
    """{NNX path: array} for a model whose parameters have the shapes/dtypes in ``like``, read from
    stable-named tensors; a missing, extra, mis-shaped or mis-typed tensor is a one-line NameTableError."""
    out, used = {}, set()
    for path, (shape, dtype) in like.items():
        e = entry(path)
        names = [e.name(t) for t in range(shape[0])] if e.per_iteration else [e.name()]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise NameTableError(f"tensor {missing[0]} is missing ({len(missing)} of the model's tensors are)")
        per_shape = shape[1:] if e.per_iteration else shape
        parts = []
        for n in names:
            x = np.asarray(tensors[n])
            if x.dtype != np.dtype(dtype):
                raise NameTableError(f"tensor {n} is {x.dtype}, the model's parameter is {np.dtype(dtype)}")
            want = _to_torch(np.empty(per_shape, np.int8), e.leaf.layout).shape
            if x.shape != want:
                raise NameTableError(f"tensor {n} has shape {list(x.shape)}, the model needs {list(want)}")
            parts.append(_from_torch(x, e.leaf.layout, per_shape))
            used.add(n)
        out[path] = np.stack(parts) if e.per_iteration else parts[0]
    extra = sorted(set(tensors) - used)
    if extra:
        raise NameTableError(f"tensor {extra[0]} belongs to no parameter of this model ({len(extra)} such tensors)")
    return out
