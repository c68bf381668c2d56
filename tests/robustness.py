"""The robustness report: what the fault and bad-input tests tried, and what became of the rows.

Tests record each case through the ``robustness`` fixture; at the end of a session that ran
every case, the report is written to ``var/test-artifacts/robustness.md`` and into the manual
between the ``robustness-report`` markers of ``docs/robustness.md``. The table is therefore
produced by the suite, never typed by hand: a case that did not run, or failed, keeps the page
as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The robustness page of the manual holds the table between its markers.
README = ROOT / "docs" / "robustness.md"
ARTIFACT = ROOT / "var" / "test-artifacts" / "robustness.md"
#: The faults of ``tests/test_faults.py``: name -> what the test does.
FAULTS: dict[str, str] = {
    "kill-9": "`kill -9` of a worker process in the middle of a batch",
    "redis-restart": "Redis restarted without persistence while rows were pending",
    "broker-down-at-save": "broker unreachable at `save()`",
    "rollback": "transaction rolled back after assignment (new row and re-upload)",
    "reupload-while-encoding": "row re-uploaded while its old version was encoding",
    "poison": "a poison picture that always crashes the encoder, in a batch of 4",
    "database-cut": "database connections cut during the worker's write-back",
    "corrupt-blob": "corrupt blobs (truncated, one bit-flipped byte) in ready rows",
}

START, END = "<!-- robustness-report:start -->", "<!-- robustness-report:end -->"


@dataclass
class Entry:
    kind: str  # "fault" | "input"
    name: str
    what: str
    outcome: str
    lost: int


@dataclass
class Report:
    expected_inputs: set[str] = field(default_factory=set)
    expected_faults: set[str] = field(default_factory=set)
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    failed_tests: int = 0

    def input(self, case, outcome: str, lost: int) -> None:
        self.entries[("input", case.name)] = Entry("input", case.name, case.what, outcome, lost)

    def fault(self, name: str, what: str, outcome: str, lost: int) -> None:
        self.entries[("fault", name)] = Entry("fault", name, what, outcome, lost)

    def complete(self) -> bool:
        inputs = {n for k, n in self.entries if k == "input"}
        faults = {n for k, n in self.entries if k == "fault"}
        return (
            not self.failed_tests
            and inputs >= self.expected_inputs
            and faults >= self.expected_faults
            and bool(self.expected_inputs)
        )

    def markdown(self) -> str:
        faults = [e for e in self.entries.values() if e.kind == "fault"]
        inputs = [e for e in self.entries.values() if e.kind == "input"]
        lost = sum(e.lost for e in self.entries.values())
        lines = [
            f"**Rows lost: {lost}** — {len(faults)} faults survived, {len(inputs)} bad inputs "
            "tried (written by the test suite: `tests/robustness.py`).",
            "",
        ]
        if faults:
            lines += ["| fault | what happened | rows lost |", "| --- | --- | --- |"]
            lines += [f"| {e.what} | {_cell(e.outcome)} | {e.lost} |" for e in faults]
            lines.append("")
        if inputs:
            lines += ["| bad input | outcome | rows lost |", "| --- | --- | --- |"]
            lines += [
                f"| {e.what} (`{e.name}`) | {_cell(e.outcome)} | {e.lost} |"
                for e in sorted(inputs, key=lambda e: e.name)
            ]
        return "\n".join(lines)

    def write(self) -> bool:
        """Write the artifact always, and the README block when every case ran and passed."""
        text = self.markdown()
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.write_text(text + "\n")
        if not self.complete():
            return False
        readme = README.read_text()
        if START not in readme or END not in readme:
            return False
        updated = re.sub(
            re.escape(START) + r".*?" + re.escape(END),
            lambda _m: f"{START}\n{text}\n{END}",
            readme,
            flags=re.S,
        )
        if updated != readme:
            README.write_text(updated)
        return True


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]
