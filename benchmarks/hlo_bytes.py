"""The bytes a compiled update moves outside its refresh, read from the compiled program's HLO.

XLA's ``cost_analysis()["bytes accessed"]`` counts a ``conditional`` as its most expensive
branch: for an update that refreshes its bases under ``lax.cond``, that is the refresh's bytes,
not the plain step's. :func:`plain_step_bytes` counts the entry computation instead, one
instruction at a time (a fusion, a matmul, a copy: its output's bytes plus each operand's), and
the ``conditional`` instructions' branches apart (and a ``while`` loop's body once per trip, where
the compiler states the trip count). It is what the step moves to and from memory
when the compiler keeps nothing between instructions in cache: an upper bound on the traffic and,
for matrices larger than the caches, close to it.

  >>> import jax, jax.numpy as jnp
  >>> text = jax.jit(lambda x, y: 2 * x + y).lower(jnp.ones(1000), jnp.ones(1000)).compile().as_text()
  >>> plain_step_bytes(text).plain  # one fusion: reads x and y, writes the sum
  12000
"""

import itertools
import math
import re
from typing import NamedTuple

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id", "replica-id"}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_NAME = re.compile(r"%[\w.\-]+")


class StepBytes(NamedTuple):
    """Bytes moved by the entry computation's instructions outside any ``conditional`` (``plain``;
    a ``while`` loop's body once per trip), by its ``conditional`` instructions' largest branches
    (``branches``), and whether the plain part holds a loop whose trip count the compiler does not
    state (``loops``; that loop is then not counted)."""

    plain: int
    branches: int
    loops: bool


def type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: ``f32[512,1376]{1,0}`` or a tuple of such types."""
    return sum(
        DTYPE_BYTES[dtype] * math.prod(int(d) for d in filter(None, dims.split(",")))
        for dtype, dims in _ARRAY.findall(hlo_type)
    )


Instruction = tuple[str, str, str, str]  # (name, type, opcode, the rest of the line)


def _instruction(head: str) -> Instruction:
    name, _, rhs = head.removeprefix("ROOT ").partition(" = ")
    if rhs.startswith("("):  # a tuple type: up to its closing parenthesis
        depths = itertools.accumulate((c == "(") - (c == ")") for c in rhs)
        end = next(i for i, depth in enumerate(depths) if depth == 0) + 1
        hlo_type, rest = rhs[:end], rhs[end:].strip()
    else:
        hlo_type, _, rest = rhs.partition(" ")
    opcode, _, rest = rest.partition("(")
    return name, hlo_type, opcode, rest


def _computations(text: str) -> tuple[str, dict[str, list[Instruction]]]:
    """The entry computation's name and every computation's instructions, in one pass over the text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = line.strip()
        if current is None:
            if head.endswith("{") and not head.startswith("HloModule"):
                is_entry = head.startswith("ENTRY ")
                name = head.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
                entry = name if is_entry else entry
                current = computations.setdefault(name, [])
        elif head == "}":
            current = None
        elif head:
            current.append(_instruction(head))
    return entry, computations


def _computation_bytes(computations: dict[str, list[Instruction]], computation: str) -> StepBytes:
    instructions = computations.get(computation, [])
    sizes = {name: type_bytes(t) for name, t, _, _ in instructions}
    plain = branches = 0
    loops = False
    for name, _, opcode, rest in instructions:
        if opcode in FREE:
            continue
        args = rest.split("),", 1)[0]  # the operand list (attributes follow it)
        if opcode == "conditional":
            called = re.search(r"branch_computations=\{([^}]*)\}", rest)
            names = [c.strip().lstrip("%") for c in called.group(1).split(",")] if called else []
            branches += max((_computation_bytes(computations, c).plain for c in names), default=0)
            continue
        if opcode == "while":  # its body once per trip, where the compiler knows the trip count
            body = re.search(r"body=%?([\w.\-]+)", rest)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
            if body and trips:
                inner = _computation_bytes(computations, body.group(1))
                plain, branches = plain + int(trips.group(1)) * inner.plain, branches + inner.branches
                loops = loops or inner.loops
            else:
                loops = True
            continue
        operands = dict.fromkeys(_NAME.findall(args))  # each operand once, in order
        plain += sizes[name] + sum(sizes.get(o, 0) for o in operands)
    return StepBytes(plain, branches, loops)


def plain_step_bytes(hlo_text: str) -> StepBytes:
    """The bytes the compiled program's entry computation moves, its ``conditional`` branches apart.

    Args:
      hlo_text: ``jax.jit(f).lower(...).compile().as_text()``.

    Returns:
      A :class:`StepBytes`.
    """
    entry, computations = _computations(hlo_text)
    return _computation_bytes(computations, entry)
