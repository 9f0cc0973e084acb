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
# the megascale runtime as host-transfer send/recv pairs tagged `_xla_megascale_transfer_type` (DCN).
# The TPU compiler may also split one collective into a start fusion, a continuation and a done
# fusion, each holding a copy of it under the same channel_id: a collective is counted once.

_ICI_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (" + "|".join(_ICI_OPS) + r"|send|recv)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_CHANNEL = re.compile(r"channel_id=(\d+)")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")  # mesh['data'=256,...] {'data'}
_PAIRS = re.compile(r"source_target_pairs=\{([\d,{}]*)\}")
_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_RENDEZVOUS = re.compile(r'_xla_host_transfer_rendezvous="([^"]+)"')
# which slices exchange: "{1,2}x{0:3}" (slices 1, 2 x chips 0..3: one group) or {{100000,200000},...}
_TARGET_SLICES = re.compile(r'_xla_megascale_target="\{([\d,]*)\}x')
_TARGET_GROUPS = re.compile(r"_xla_megascale_target=\{\{([\d,]*)\}")
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


def _tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape "(a, (b, c), d)"; [shape] for an array."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    out, depth, cur = [], 0, ""
    for ch in shape[1:-1]:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur] if cur.strip() else out


@dataclass(frozen=True)
class Collective:
    name: str
    op: str  # all-reduce | all-gather | reduce-scatter | all-to-all | collective-permute (ICI), or the
    #          megascale transfer type (ALL_REDUCE, ALL_GATHER, ...) for what crosses slices (DCN)
    network: str  # "ici" | "dcn"
    payload: int  # bytes per chip: the op's full buffer (all-gather: gathered; reduce-scatter: its input)
    group: int  # participants: ICI chips of its replica group; DCN slices of its transfer group
    runs: float  # times per step: the enclosing loops' trip counts, summed over call sites
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
    """Computation -> (times it runs per step, inside a while loop): the sum over its call sites of
    the caller's runs times, for a while body, its known_trip_count, else `loop_trips` (asura's
    depth loop has a traced trip count). Every branch of a conditional counts as running (an upper
    bound)."""
    callers: dict[str, list[tuple[str, float, bool]]] = {}
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
            callers.setdefault(callee, []).append((comp, times, looped))
        for group in _BRANCHES.findall(line):
            for c in group.split(","):
                callers.setdefault(c.strip().lstrip("%"), []).append((comp, 1.0, False))
    memo: dict[str, tuple[float, bool]] = {}

    def runs(c: str) -> tuple[float, bool]:
        if c not in memo:
            memo[c] = (1.0, False) if c == entry else (0.0, False)  # HLO has no recursion
            if c != entry:
                total, looped = 0.0, False
                for caller, k, lp in callers.get(c, ()):
                    t, inner = runs(caller)
                    total, looped = total + t * k, looped or ((lp or inner) and t > 0)
                memo[c] = (total, looped)
        return memo[c]

    comps = {m.group(1) for line in hlo.splitlines() if (m := _COMP.match(line))}
    return {c: runs(c) for c in comps}


def collectives(hlo: str, slices: int = 1, loop_trips: float = 1.0) -> list[Collective]:
    """Every collective of a compiled per-slice TPU program with its network, payload and runs per
    step. slices: the slice count (a DCN transfer whose target does not name its group spans all);
    loop_trips: the runs of a while loop whose trip count the compiler does not know."""
    runs = _multipliers(hlo, loop_trips)
    received: dict[str, int] = {}  # DCN rendezvous -> bytes a chip receives (an all-gather's result)
    for line in hlo.splitlines():
        if (m := _OP.match(line)) and m.group(3) == "recv" and (r := _RENDEZVOUS.search(line)):
            received[r.group(1)] = (_array_bytes(_tuple_elements(m.group(2))[0]) or [0])[0]
    out, seen, comp = [], set(), ""
    for line in hlo.splitlines():
        if m := _COMP.match(line):
            comp = m.group(1)
            continue
        if not (m := _OP.match(line)) or m.group(3) == "recv":
            continue
        name, shape, op, start = m.groups()
        times, looped = runs.get(comp, (1.0, False))
        if op == "send":
            if not (t := _TRANSFER.search(line)):
                continue  # a send that is not a cross-slice transfer
            sent = (_array_bytes(_tuple_elements(shape)[0]) or [0])[0]
            r = _RENDEZVOUS.search(line)
            payload = max(sent, received.get(r.group(1), 0) if r else 0)  # all-gather: the gathered bytes
            out.append(Collective(name, t.group(1), "dcn", payload, _dcn_group(line, slices), times, looped))
            continue
        if (ch := _CHANNEL.search(line)) is not None:
            if (op, ch.group(1)) in seen:
                continue  # another piece of a split (start / continuation / done) collective
            seen.add((op, ch.group(1)))
        parts = _tuple_elements(shape)
        if start and op in ("all-gather", "collective-permute", "reduce-scatter"):
            parts = parts[1:2]  # (operands, results, contexts...): the results
        payload, group = sum(_array_bytes(",".join(parts))), _group_size(line, name)
        if op == "reduce-scatter":
            payload *= group  # its input: the result is one chip's share
        out.append(Collective(name, op, "ici", payload, group, times, looped))
    return out


def _dcn_group(line: str, slices: int) -> int:
    """Slices in one transfer group, from `_xla_megascale_target` (all of them when it is absent)."""
    if m := _TARGET_SLICES.search(line):
        return m.group(1).count(",") + 1
    if m := _TARGET_GROUPS.search(line):
        return m.group(1).count(",") + 1
    return slices


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
