"""Record validation and JSONL I/O.

A record is a dict, either instruction style ``{"instruction", "input" (optional), "output"}``
(Alpaca/Dolly) or ``{"text"}``; extra keys such as ``"category"`` are kept. Validation happens at
load time so a bad line fails with its ``path:line`` instead of deep inside training.
"""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Bad or missing data; the message names the file, line or key at fault."""


def record_problem(record: object) -> str | None:
    """Why ``record`` is not a valid record (expected vs got), or None when it is valid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "instruction" in record:
        instruction = record["instruction"]
        if not isinstance(instruction, str) or not instruction.strip():
            return f'expected "instruction" to be a non-empty string, got {instruction!r}'
        if not isinstance(record.get("output"), str):
            got = repr(record["output"]) if "output" in record else "no \"output\" key"
            return f'expected "output" to be a string, got {got}'
        if not isinstance(record.get("input", ""), str):
            return f'expected "input" to be a string or missing, got {record["input"]!r}'
        return None
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            return f'expected "text" to be a non-empty string, got {text!r}'
        return None
    return (
        'expected an instruction record {"instruction", "output"} or a text record {"text"}, '
        f"got keys {sorted(record)}"
    )


def jsonl_lines(path: str | Path) -> list[str]:
    """A JSONL file's lines: UTF-8 with or without a BOM, split on "\n" only (str.splitlines would
    also split inside a record's text at U+2028, U+0085, ..., which JSON strings hold raw)."""
    try:
        return Path(path).read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc


def load_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a JSONL file of records; blank lines are skipped."""
    lines = jsonl_lines(path)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: expected a JSON object, got invalid JSON ({exc.msg})"
            ) from None
        problem = record_problem(record)
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        records.append(record)
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (UTF-8, non-ASCII kept readable)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def has_reference(record: dict) -> bool:
    """Instruction records carry a reference answer that exact match can score."""
    return "instruction" in record and isinstance(record.get("output"), str)
