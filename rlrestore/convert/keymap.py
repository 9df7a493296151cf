"""Key mapping and checking shared by the converters.

A conversion declares, per source, which key prefixes become which policy keys (:class:`Rename`),
which it leaves out on purpose and why (:class:`Ignore`), and which keys must equal another source
key (:class:`SameAs`, e.g. a tied ``lm_head``). :func:`plan` applies them; :func:`check` refuses the
conversion, listing every problem at once, when a source key is used by no rule, a policy key gets no
tensor, or a shape differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlrestore.convert.sources import ConversionError, TensorStore

LISTED = 12  # keys named per kind of problem before "... and N more"


@dataclass(frozen=True)
class Rename:
    """Source keys starting with ``source`` become policy keys starting with ``target``."""

    source: str
    target: str


@dataclass(frozen=True)
class Ignore:
    """Source keys starting with ``prefix`` are deliberately not converted, for ``reason``."""

    prefix: str
    reason: str


@dataclass(frozen=True)
class SameAs:
    """Source keys starting with ``prefix`` must equal the keys starting with ``of`` (same suffix) of
    ``other`` (default: the same source): a copy the source's own loader ties or never reads. Values
    are compared in the lower of the two precisions; with ``strict=False`` a difference is only noted
    (a missing counterpart or another shape is still refused)."""

    prefix: str
    of: str
    reason: str
    other: TensorStore | None = None
    strict: bool = True


@dataclass(frozen=True)
class Assignment:
    """One policy tensor and where it comes from."""

    store: TensorStore
    key: str

    def load(self) -> torch.Tensor:
        return self.store.get(self.key)


@dataclass(frozen=True)
class CopyCheck:
    """Keys of ``store`` that a :class:`SameAs` rule compares with their counterparts."""

    rule: SameAs
    store: TensorStore
    keys: list[str]


@dataclass
class IgnoredGroup:
    source: str
    prefix: str
    count: int
    reason: str


@dataclass
class Plan:
    """Where every policy tensor comes from and what happened to every source key."""

    assignments: dict[str, Assignment] = field(default_factory=dict)
    ignored: list[IgnoredGroup] = field(default_factory=list)
    copies: list[CopyCheck] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # "<source>: <key>"
    conflicts: list[str] = field(default_factory=list)
    renames: list[tuple[str, Rename]] = field(
        default_factory=list
    )  # (source name, rule), to name missing keys

    def expected_source(self, target: str) -> str:
        """Where a policy key would have come from, for messages."""
        for source, rule in self.renames:
            if target.startswith(rule.target):
                return f"{source}: {rule.source}{target[len(rule.target) :]}"
        return "no source rule"

    def merge(self, other: Plan) -> None:
        for target, assignment in other.assignments.items():
            if target in self.assignments:
                self.conflicts.append(
                    f"{target} (from {assignment.store.name} and {self.assignments[target].store.name})"
                )
            self.assignments[target] = assignment
        self.ignored += other.ignored
        self.copies += other.copies
        self.unused += other.unused
        self.conflicts += other.conflicts
        self.renames += other.renames


def plan(store: TensorStore, renames: list[Rename], ignores: list[Ignore], same: list[SameAs] = ()) -> Plan:
    """Apply the rules to every key of ``store``. A key is used when renamed or checked as a copy
    (both may apply), else ignored; a key none of the rules covers is unused."""
    result = Plan(renames=[(store.name, rule) for rule in renames])
    counts = {rule: 0 for rule in ignores}
    copies = {rule: [] for rule in same}
    for key in store.names():
        targets = [rule.target + key[len(rule.source) :] for rule in renames if key.startswith(rule.source)]
        for target in targets:
            if target in result.assignments:
                result.conflicts.append(f"{target} (from {result.assignments[target].key} and {key})")
            result.assignments[target] = Assignment(store, key)
        ignore = next((rule for rule in ignores if key.startswith(rule.prefix)), None)
        copy = next((rule for rule in same if key.startswith(rule.prefix)), None)
        if ignore is not None and not targets:
            counts[ignore] += 1
        elif copy is not None:
            copies[copy].append(key)
        elif not targets:
            result.unused.append(store.where(key))
    result.ignored = [
        IgnoredGroup(store.name, rule.prefix, n, rule.reason) for rule, n in counts.items() if n
    ]
    result.copies = [CopyCheck(rule, store, keys) for rule, keys in copies.items() if keys]
    return result


def _listed(items: list[str]) -> str:
    shown = "\n    ".join(items[:LISTED])
    more = f"\n    ... and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"\n    {shown}{more}"


def check(result: Plan, expected: dict[str, torch.Size], fresh: tuple[str, ...] = ()) -> list[str]:
    """Refuse, naming keys, when a source key is unused, a policy key (outside the ``fresh`` prefixes,
    initialised anew) gets no tensor, gets a tensor of another shape, two sources claim one key, or a
    :class:`SameAs` copy does not match. Returns notes on non-strict copies that differ."""
    problems = []
    if result.unused:
        problems.append(
            f"{len(result.unused)} source tensor(s) match no conversion rule:" + _listed(result.unused)
        )
    missing = sorted(key for key in expected if key not in result.assignments and not key.startswith(fresh))
    if missing:
        named = [f"{key} (expected from {result.expected_source(key)})" for key in missing]
        problems.append(f"{len(missing)} policy tensor(s) have no source tensor:" + _listed(named))
    unknown = sorted(key for key in result.assignments if key not in expected)
    if unknown:
        named = [
            f"{key} <- {result.assignments[key].store.where(result.assignments[key].key)}" for key in unknown
        ]
        problems.append(f"{len(unknown)} source tensor(s) map to no policy tensor:" + _listed(named))
    shapes = [
        f"{a.store.where(a.key)}: expected {tuple(expected[key])}, found {tuple(a.store.shape(a.key))}"
        for key, a in sorted(result.assignments.items())
        if key in expected and a.store.shape(a.key) != expected[key]
    ]
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) have the wrong shape:" + _listed(shapes))
    if result.conflicts:
        problems.append("policy tensor(s) claimed twice:" + _listed(result.conflicts))
    copy_problems, notes = _check_copies(result)
    problems += copy_problems
    if problems:
        raise ConversionError("cannot convert: " + "\n  ".join(problems))
    return notes


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality in the lower of the two precisions (a bf16 copy of a float32 tensor is equal)."""
    if a.dtype != b.dtype:
        lower = min(
            a.dtype, b.dtype, key=lambda dtype: torch.finfo(dtype).bits if dtype.is_floating_point else 64
        )
        a, b = a.to(lower), b.to(lower)
    return torch.equal(a, b)


def _check_copies(result: Plan) -> tuple[list[str], list[str]]:
    """Every :class:`SameAs` key must exist in its reference with the same shape (and values)."""
    problems, notes = [], []
    for copy in result.copies:
        rule, store, keys = copy.rule, copy.store, copy.keys
        other = rule.other or store
        differing = []
        for key in keys:
            twin = rule.of + key[len(rule.prefix) :]
            if twin not in other:
                problems.append(
                    f"{store.name}: {key} has no counterpart {twin} in {other.name} ({rule.reason})"
                )
            elif store.shape(key) != other.shape(twin):
                problems.append(
                    f"{store.name}: {key}: expected {tuple(other.shape(twin))} like {twin}, "
                    f"found {tuple(store.shape(key))} ({rule.reason})"
                )
            elif not _equal(store.get(key), other.get(twin)):
                differing.append(key)
        if differing and rule.strict:
            problems += [
                f"{store.name}: {key} differs from its counterpart ({rule.reason})" for key in differing
            ]
        elif differing:
            notes.append(
                f"{len(differing)} of {len(keys)} tensors under {store.name}: {rule.prefix} differ from "
                f"{other.name}: {rule.of} ({rule.reason})"
            )
    return problems, notes
