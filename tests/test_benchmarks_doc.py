"""BENCHMARKS.md names the CPU of every timing table, so that figures from different machines are
never read as one (the CPU under the development machines changes between sessions)."""

import re
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
# A CPU named by model: its vendor's line, or family and model numbers as /proc/cpuinfo gives them.
CPU_NAME = re.compile(r"EPYC|Xeon|Ryzen|Core i[3579]|family \d+ model \d+")
# A table cell holding a time or a rate.
TIMING = re.compile(r"\d\s?(ms|us|µs|s|GFLOP/s|GB/s)\b|tok(ens)?/s")


@dataclass
class Section:
    level: int
    title: str
    lines: list[str] = field(default_factory=list)

    def names_cpu(self) -> bool:
        return bool(CPU_NAME.search(self.title) or CPU_NAME.search("\n".join(self.lines)))

    def has_timing_table(self) -> bool:
        return bool(TIMING.search("\n".join(line for line in self.lines if line.startswith("|"))))


def sections(text: str) -> list[Section]:
    """The document's sections by heading, code blocks left whole (a `#` there is a comment)."""
    out: list[Section] = []
    in_code = False
    for line in text.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"(#+) ", line)
        if heading:
            out.append(Section(len(heading.group(1)), line))
        elif out:
            out[-1].lines.append(line)
    return out


def unnamed_timing_tables(text: str) -> list[str]:
    """Titles of sections with a timing table whose CPU neither they nor an enclosing section
    (below the document's own heading, whose introduction lists every CPU) name."""
    found = sections(text)
    missing = []
    for i, section in enumerate(found):
        if not section.has_timing_table() or section.names_cpu():
            continue
        level, named = section.level, False
        for outer in reversed(found[:i]):
            if level <= 2:
                break
            if outer.level < level:
                level, named = outer.level, outer.names_cpu()
                if named:
                    break
        if not named:
            missing.append(section.title)
    return missing


def test_every_timing_table_names_its_cpu():
    assert unnamed_timing_tables(BENCHMARKS.read_text()) == []


def test_the_check_finds_a_table_without_its_cpu():
    text = "\n".join(
        [
            "# Benchmarks",
            "Measured on an AMD EPYC and an Intel Xeon.",
            "## 1. Layer",
            "| shape | time |",
            "|---|---|",
            "| fine | 12.5 ms |",
            "## 2. Decode, on an Intel Xeon (family 6 model 207)",
            "| T | tok/s |",
            "|---|---|",
            "| 8 | 140 |",
            "### A subsection",
            "| T | time |",
            "|---|---|",
            "| 8 | 3 ms |",
            "## 3. Losses",
            "| model | loss |",
            "|---|---|",
            "| dense | 2.35 |",
            "```bash",
            "# not a heading",
            "```",
        ]
    )
    assert unnamed_timing_tables(text) == ["## 1. Layer"]
