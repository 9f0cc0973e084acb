"""Reading a compiled program's HLO text: which instructions move data only to change its layout.

XLA inserts a transpose, or a copy into another physical layout, where an operand's layout does
not suit its consumer (a dot that wants its contracting axis minor, say). On the CPU these were a
third of the train step (issue #18); `bench/op_profile.py` times them and tests/test_model_layout.py
keeps them small. Text parsing, because the compiled module is only exposed as text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(")  # shape: array or tuple
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COPY_OF = re.compile(r" copy\(%([\w.\-]+)\)")


@dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # e.g. f32[8,256,1024]{2,1,0}
    opcode: str
    computation: str  # the computation it sits in
    called: str | None  # for fusions and calls: the computation it runs
    moves_layout: bool  # a transpose, or a copy into another physical order

    @property
    def elements(self) -> int:
        return math.prod(_dims(self.shape))


@dataclass(frozen=True)
class Module:
    instructions: dict[str, Instruction]

    def layout_moves(self) -> list[Instruction]:
        """Every transpose and layout-changing copy, top level or inside a fused computation."""
        return [i for i in self.instructions.values() if i.moves_layout]

    def ops_moving_layout(self) -> frozenset[str]:
        """Instructions that move layout themselves or run a computation that does (what a
        profile's op events are named after)."""
        moving = {i.computation for i in self.layout_moves()}
        return frozenset(i.name for i in self.instructions.values() if i.moves_layout or i.called in moving)


# AllocateBuffer (GPU/TPU) or asura.native.uninitialised's CPU handler
_ALLOC = re.compile(
    r'^\s*(?:ROOT )?%([\w.\-]+) = .* custom-call\(\).*custom_call_target="(?:AllocateBuffer|asura_uninitialised)"', re.M
)


@dataclass(frozen=True)
class Buffers:
    uninitialised: int  # allocations handed out without a fill (AllocateBuffer; ours on the CPU)
    copied: int  # copies of one (a shared allocation XLA had to duplicate: as costly as a fill)


def uninitialised_buffers(hlo: str) -> Buffers:
    """How the while driver's S-row buffers (asura.native.uninitialised.empty) came out of the compiler."""
    names = set(_ALLOC.findall(hlo))
    copied = sum(1 for src in _COPY_OF.findall(hlo) if src in names)
    return Buffers(len(names), copied)


def parse(hlo: str) -> Module:
    instructions: dict[str, Instruction] = {}
    comp = ""
    for line in hlo.splitlines():
        if m := _COMP.match(line):
            comp = m.group(1)
        elif m := _INSTR.match(line):
            name, shape, opcode = m.groups()
            moves = opcode == "transpose"
            if opcode == "copy" and (src := _COPY_OF.search(line)) and src.group(1) in instructions:
                moves = _order(instructions[src.group(1)].shape) != _order(shape)
            called = _CALLS.search(line)
            instructions[name] = Instruction(name, shape, opcode, comp, called and called.group(1), moves)
    return Module(instructions)


def _dims(shape: str) -> list[int]:
    if "[" not in shape:
        return []
    return [int(d) for d in re.findall(r"\d+", shape[shape.index("[") : shape.index("]")])]


def _order(shape: str) -> tuple[int, ...]:
    """Physical order (minor to major) of the axes longer than 1: where a size-1 axis sits moves
    no data, so f32[8,1,4]{2,1,0} and f32[8,1,4]{1,2,0} are the same bytes."""
    if "{" not in shape:  # scalars and tuples carry no layout to compare
        return ()
    dims = _dims(shape)
    order = [int(i) for i in re.findall(r"\d+", shape[shape.index("{") : shape.index("}")])]
    return tuple(i for i in order if dims[i] > 1)


# ------------------------------------------------------------------ collectives (issue #30)
#
# A multi-slice TPU program is compiled per slice: collectives inside a slice are ordinary HLO
# collectives over replica groups of that slice's chips (ICI), and what crosses slices is handed to
# the megascale runtime as host-transfer `send`s tagged `_xla_megascale_transfer_type` (DCN).

_ICI_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (" + "|".join(_ICI_OPS) + r"|send)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")  # mesh['data'=256,...] {'data'}
_PAIRS = re.compile(r"source_target_pairs=\{([\d,{}]*)\}")
_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_WHILE = re.compile(r"\bwhile\(.*?body=%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLEES = re.compile(r"(?:calls|to_apply|condition|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _array_bytes(shape: str) -> list[int]:
    """Bytes of each array in an HLO shape string (a tuple gives several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        width = _BYTES.get(dtype) or (1 if dtype.startswith("f8") else max(int(dtype[1:]) // 8, 1))
        out.append(width * math.prod(int(d) for d in dims.split(",") if d))
    return out


@dataclass(frozen=True)
class Collective:
    name: str
    op: str  # all-reduce | all-gather | reduce-scatter | all-to-all | collective-permute (ICI), or the
    #          megascale transfer type (ALL_REDUCE, ...) for what crosses slices (DCN)
    network: str  # "ici" | "dcn"
    payload: int  # bytes: ICI the op's full buffer (all-gather: gathered; reduce-scatter: its input);
    #              DCN the buffer one chip hands to the megascale runtime
    group: int  # participants: ICI replica-group size; DCN the slice count
    runs: float  # times per step: the product of the enclosing loops' trip counts
    in_loop: bool = False  # inside a while loop (asura's depth loop, grad accumulation)

    @property
    def sent(self) -> float:
        """Bytes one chip sends per run, for a ring (bandwidth-optimal) algorithm over `group`."""
        g = self.group
        if g <= 1:
            return 0.0
        if self.op in ("all-reduce", "ALL_REDUCE"):
            return 2 * (g - 1) / g * self.payload
        if self.op == "collective-permute":
            return float(self.payload)
        return (g - 1) / g * self.payload  # all-gather, reduce-scatter, all-to-all, other transfers


def _multipliers(hlo: str, loop_trips: float) -> dict[str, tuple[float, bool]]:
    """Computation -> (times it runs per step, inside a while loop): a while body runs its
    known_trip_count, else `loop_trips` (asura's depth loop has a traced trip count) times per run
    of its caller."""
    calls: dict[str, list[tuple[str, float, bool]]] = {}
    entry, comp = None, ""
    for line in hlo.splitlines():
        if m := _COMP.match(line):
            comp = m.group(1)
            entry = comp if line.startswith("ENTRY") else entry
            continue
        body = _WHILE.search(line)
        trips = _TRIPS.search(line)
        for callee in _CALLEES.findall(line):
            looped = bool(body) and callee == body.group(1)
            times = (float(trips.group(1)) if trips else loop_trips) if looped else 1.0
            calls.setdefault(comp, []).append((callee, times, looped))
        for group in _BRANCHES.findall(line):
            calls.setdefault(comp, []).extend((c.strip().lstrip("%"), 1.0, False) for c in group.split(","))
    runs: dict[str, tuple[float, bool]] = {}
    stack = [(entry, 1.0, False)] if entry else []
    while stack:
        comp, times, looped = stack.pop()
        if runs.get(comp, (0.0, False))[0] >= times:
            continue
        runs[comp] = (times, looped)
        stack.extend((callee, times * k, looped or lp) for callee, k, lp in calls.get(comp, ()))
    return runs


def collectives(hlo: str, slices: int = 1, loop_trips: float = 1.0) -> list[Collective]:
    """Every collective of a compiled per-slice TPU program with its network, payload and runs per
    step. loop_trips: the runs of a while loop whose trip count the compiler does not know."""
    runs = _multipliers(hlo, loop_trips)
    out, comp = [], ""
    for line in hlo.splitlines():
        if m := _COMP.match(line):
            comp = m.group(1)
            continue
        if not (m := _OP.match(line)):
            continue
        name, shape, op, start = m.groups()
        sizes = _array_bytes(shape)
        if op == "send":
            if not (t := _TRANSFER.search(line)):
                continue  # a send that is not a cross-slice transfer
            times, looped = runs.get(comp, (1.0, False))
            out.append(Collective(name, t.group(1), "dcn", sizes[0] if sizes else 0, slices, times, looped))
            continue
        if start and op in ("all-gather", "collective-permute"):
            sizes = sizes[1:2]  # (operand, result, contexts...): the result
        payload, group = sum(sizes), _group_size(line, name)
        if op == "reduce-scatter":
            payload *= group  # its input: the result is one chip's share
        times, looped = runs.get(comp, (1.0, False))
        out.append(Collective(name, op, "ici", payload, group, times, looped))
    return out


def _group_size(line: str, name: str) -> int:
    """Participants of one group; ValueError for a format this reader does not know (rather than a
    silently wrong byte count)."""
    if m := _GROUPS_LIST.search(line):
        return m.group(1).split("}")[0].count(",") + 1
    if m := _GROUPS_IOTA.search(line):
        return int(m.group(2))
    if m := _GROUPS_MESH.search(line):  # the listed mesh axes form a group
        sizes = {k.strip("'"): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a.strip())
    if _PAIRS.search(line):  # collective-permute: a pair per hop
        return 2
    raise ValueError(f"collective {name}: replica groups in a format asura.hlo does not read: {line.strip()[:200]}")
