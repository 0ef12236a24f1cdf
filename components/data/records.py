"""Record validation and JSONL I/O.

A record is a dict in one of the forms Hugging Face datasets use:
- chat: ``{"messages": [{"role", "content"}, ...]}``, trained on the assistant turns;
- prompt-completion: ``{"prompt", "completion"}`` (strings, or lists of chat messages);
- instruction (Alpaca/Dolly): ``{"instruction", "input" (optional), "output"}``;
- plain text: ``{"text"}``, trained on all of it.
Extra keys such as ``"category"`` are kept. Validation happens at load time so a bad line fails
with its ``path:line`` instead of deep inside training.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
FORMS = ('a chat record {"messages"}, a prompt-completion record {"prompt", "completion"}, '
         'an instruction record {"instruction", "output"} or a text record {"text"}')


class DataError(ValueError):
    """Bad or missing data; the message names the file, line or key at fault."""


def messages_problem(messages: object, key: str = "messages") -> str | None:
    if not isinstance(messages, list) or not messages:
        return f'expected "{key}" to be a non-empty list of {{"role", "content"}} objects, got {messages!r:.80}'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            return (f'expected "{key}"[{i}] to be {{"role": one of {list(ROLES)}, "content": a string}}, '
                    f"got {message!r:.80}")
    return None


def record_problem(record: object) -> str | None:
    """Why ``record`` is not a valid record (expected vs got), or None when it is valid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        problem = messages_problem(record["messages"])
        if problem:
            return problem
        if not any(m["role"] == "assistant" and m["content"].strip() for m in record["messages"]):
            return 'expected "messages" to hold an assistant turn with content (the turns trained on), got none'
        if record["messages"][0]["role"] == "assistant":
            return 'expected "messages" to start with a system or user turn (an assistant turn answers one), got assistant'
        return None
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt-completion
            problem = messages_problem(prompt, "prompt") or messages_problem(completion, "completion")
            if problem is None and any(m["role"] != "assistant" for m in completion):
                problem = 'expected every "completion" message to have role "assistant"'
            return problem
        if not isinstance(prompt, str) or not prompt.strip():
            return f'expected "prompt" to be a non-empty string, got {prompt!r}'
        if not isinstance(completion, str) or not completion.strip():
            return f'expected "completion" to be a non-empty string, got {completion!r}'
        return None
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
    return f"expected {FORMS}, got keys {sorted(record)}"


def normalized(record: dict) -> dict:
    """A valid record in the form training reads: conversational prompt-completion becomes chat."""
    if isinstance(record.get("prompt"), list):
        rest = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
        return {**rest, "messages": record["prompt"] + record["completion"]}
    return record


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
        records.append(normalized(record))
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (UTF-8, non-ASCII kept readable)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def reference(record: dict) -> str | None:
    """The answer exact match scores a record by: its output, completion or final assistant turn."""
    if "messages" in record:
        last = record["messages"][-1]
        return last["content"] if last["role"] == "assistant" else None
    if isinstance(record.get("completion"), str):
        return record["completion"]
    return record["output"] if "instruction" in record and isinstance(record.get("output"), str) else None
