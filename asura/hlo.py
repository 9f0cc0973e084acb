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
