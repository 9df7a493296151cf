"""The bad-input campaign's ledger: each case records its outcome, and ``pytest`` prints them as
one table at the end of the run (``conftest.pytest_terminal_summary``)."""

from __future__ import annotations

from dataclasses import dataclass

ACCEPTED = ("clear error", "skipped + reported", "handled")


@dataclass(frozen=True)
class Outcome:
    area: str  # data build, restore, eval, config, checkpoint, rewards, training
    case: str  # what was fed in
    outcome: str  # one of ACCEPTED, or "CRASH"
    detail: str  # the message the user saw (first line)


OUTCOMES: list[Outcome] = []


def record(area: str, case: str, outcome: str, detail: str) -> Outcome:
    """Add a case to the ledger; ``outcome`` outside :data:`ACCEPTED` marks a failure."""
    entry = Outcome(area, case, outcome, detail.strip().splitlines()[0][:110] if detail.strip() else "")
    OUTCOMES.append(entry)
    return entry


def table() -> str:
    """The ledger as a fixed-width text table."""
    rows = [
        ("area", "case", "outcome", "what the user sees"),
        *((o.area, o.case, o.outcome, o.detail) for o in OUTCOMES),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [" | ".join(row[i].ljust(widths[i]) for i in range(3)) + " | " + row[3] for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    return "\n".join(lines)
