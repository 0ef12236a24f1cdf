"""Multiple-choice evaluation by log-likelihood, as lm-evaluation-harness scores MMLU.

Each question is asked as "<question>\\nA. ...\\nB. ...\\nAnswer:" after k solved examples of its
subject (k-shot); the model's choice is the letter continuation (" A", " B", ...) with the highest
log-likelihood. Nothing is generated, so scoring costs one forward pass per question.

Questions come from an MMLU folder (``test/<subject>_test.csv`` and ``dev/<subject>_dev.csv`` with
the header question,choice0..choiceN,answer; answer is the 0-based index) or a JSONL file of
``{"question", "choices": [...], "answer": index, "subject" (optional)}`` records.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from flare_lora.components.data.records import DataError

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int


def load_questions(path: str, split: str = "test", limit: int | None = None) -> dict[str, list[Question]]:
    """{subject: questions} from an MMLU folder's ``split`` or a JSONL file; the first ``limit`` per subject."""
    source = Path(path)
    if source.is_dir():
        files = sorted((source / split).glob(f"*_{split}.csv"))
        if not files:
            raise DataError(f"{source}: expected MMLU CSVs {split}/<subject>_{split}.csv, found none")
        by_subject = {f.name[: -len(f"_{split}.csv")]: _read_csv(f) for f in files}
    elif source.is_file():
        by_subject = _read_jsonl(source)
    else:
        raise DataError(f"multiple-choice data not found: {source}")
    return {s: qs[:limit] if limit else qs for s, qs in sorted(by_subject.items()) if qs}


def load_shots(path: str) -> dict[str, list[Question]]:
    """Solved examples for k-shot prompts: an MMLU folder's dev split, or ``<stem>.dev.jsonl`` beside a
    JSONL file ({} where there is none)."""
    source = Path(path)
    if source.is_dir():
        return load_questions(path, "dev") if (source / "dev").is_dir() else {}
    dev = source.with_name(source.name.removesuffix(".jsonl") + ".dev.jsonl")
    return load_questions(str(dev)) if dev.is_file() else {}


def check_source(path: str, limit: int | None, k: int, site: str) -> None:
    """DataError naming ``site`` unless ``path``'s questions load and every subject has k solved examples."""
    try:
        questions = load_questions(path, limit=limit)
        shots = load_shots(path) if k else {}
    except DataError as e:
        raise DataError(f"{site}: key 'eval_mc': {e}") from None
    short = sorted(s for s in questions if len(shots.get(s, [])) < k)
    if short:
        raise DataError(f"{site}: key 'eval_mc_shots': {k}-shot needs {k} solved examples per subject (an MMLU dev/ "
                        f"split or <name>.dev.jsonl); subject {short[0]!r} has {len(shots.get(short[0], []))}")


def _read_csv(path: Path) -> list[Question]:
    subject = path.name.rsplit("_", 1)[0]
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        choices = [c for c in reader.fieldnames or [] if c.startswith("choice")]
        if "question" not in (reader.fieldnames or []) or "answer" not in (reader.fieldnames or []) or len(choices) < 2:
            raise DataError(f"{path}: expected the header question,choice0,...,answer; got {reader.fieldnames}")
        return [_question(subject, row["question"], [row[c] for c in choices], row["answer"], f"{path}:{reader.line_num}")
                for row in reader]


def _read_jsonl(path: Path) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: expected a JSON object, got invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("choices"), list):
            raise DataError(f'{where}: expected {{"question": str, "choices": [str, ...], "answer": index}}, got {line[:80]!r}')
        question = _question(str(row.get("subject", "all")), row["question"], row["choices"], row.get("answer"), where)
        out.setdefault(question.subject, []).append(question)
    return out


def _question(subject: str, text: str, choices: list, answer, where: str) -> Question:
    if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: expected 2 to {len(LETTERS)} string choices, got {choices!r:.80}")
    try:
        index = int(answer)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(choices) or str(answer).strip() not in (str(index), f"{index}.0"):
        raise DataError(f"{where}: expected answer to be a choice index 0..{len(choices) - 1}, got {answer!r}")
    return Question(subject, text, tuple(choices), index)


def _block(q: Question, with_answer: bool) -> str:
    options = "".join(f"\n{LETTERS[i]}. {c.strip()}" for i, c in enumerate(q.choices))
    return f"{q.question.strip()}{options}\nAnswer:" + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")


def prompt(q: Question, shots: list[Question]) -> str:
    """lm-eval-harness' MMLU prompt: a description line, k solved examples, the question."""
    subject = q.subject.replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "".join(_block(s, True) for s in shots) + _block(q, False)


def answer_tokens(tokenizer) -> list[int]:
    """The token of each letter continuation " A", " B", ... after "Answer:", as the tokenizer splits
    the whole text (a SentencePiece tokenizer encodes " A" alone as two tokens, after "Answer:" as one)."""
    context = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    tokens = []
    for letter in LETTERS:
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        continuation = full[len(context):] if full[: len(context)] == context else []
        if len(continuation) != 1:
            raise ValueError(f"tokenizer {type(tokenizer).__name__}: the answer ' {letter}' after 'Answer:' is "
                             f"{len(continuation)} tokens, expected 1 (letter log-likelihood scoring needs one)")
        tokens.append(continuation[0])
    return tokens


def cloze_prompt(q: Question, shots: list[Question]) -> str:
    """lm-evaluation-harness' ``mmlu_continuation`` prompt: the question alone, answered by a choice's text."""
    head = f"The following are questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    solved = "".join(f"Question: {s.question.strip()}\nAnswer: {s.choices[s.answer].strip()}\n\n" for s in shots)
    return head + solved + f"Question: {q.question.strip()}\nAnswer:"


def _continuation(tokenizer, context: str, text: str) -> list[int]:
    """Tokens of ``text`` after ``context``, as the tokenizer splits the whole (lm-eval-harness' rule)."""
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + text, add_special_tokens=False)["input_ids"]
    tail = full[len(head):] if full[: len(head)] == head else tokenizer(text, add_special_tokens=False)["input_ids"]
    return tail or tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def choice_picks(model, tokenizer, contexts: list[list[int]], choices: list[list[list[int]]],
                 lengths: list[list[int]] | None = None) -> list[int]:
    """The choice of each item with the highest log-likelihood of its tokens after the item's context,
    divided by ``lengths`` (characters: lm-eval's ``acc_norm``; None: the plain sum).

    One forward pass per item: the context followed by every choice, each choice attending to the
    context and to itself only (a 4D mask), its positions continuing the context's."""
    lengths = lengths or [[1] * len(options) for options in choices]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    rows, spans = [], []
    for context, options in zip(contexts, choices):
        ids, pos, seg, item = list(context), list(range(len(context))), [0] * len(context), []
        for c, tokens in enumerate(options):
            item.append((len(ids), tokens))
            ids += tokens
            pos += range(len(context), len(context) + len(tokens))
            seg += [c + 1] * len(tokens)
        rows.append((ids, pos, seg))
        spans.append(item)
    width = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows], device=device)
    pos = torch.tensor([r[1] + [0] * (width - len(r[1])) for r in rows], device=device)
    seg = torch.tensor([r[2] + [-1] * (width - len(r[2])) for r in rows], device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])) & (seg[:, None, :] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding attends to itself: no empty row
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    logits = model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos).logits
    picks = []
    for row, (context, item) in enumerate(zip(contexts, spans)):
        scores = []
        for (start, tokens), chars in zip(item, lengths[row]):
            before = [len(context) - 1] + list(range(start, start + len(tokens) - 1))  # the position predicting each token
            logp = torch.log_softmax(logits[row, before].float(), -1)
            scores.append(logp[torch.arange(len(tokens)), torch.tensor(tokens, device=device)].sum().item() / max(chars, 1))
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


@torch.no_grad()
def accuracy(model, tokenizer, questions: dict[str, list[Question]], *, shots: dict[str, list[Question]] | None = None,
             k: int = 0, batch_size: int = 8, max_length: int = 2048, style: str = "letter") -> dict:
    """{"accuracy", "n", "subjects": {subject: accuracy}} of ``model`` on ``questions``.

    style "letter" (lm-eval-harness' ``mmlu``): the lettered choices are shown and the letter with
    the highest log-likelihood is the answer. "cloze" (``mmlu_continuation``, the format SmolLM2's
    reported MMLU numbers use): only the question is shown; the choice text with the highest
    log-likelihood per character is the answer. k-shot prompts take the first k of
    ``shots[subject]`` (MMLU's dev split). A prompt longer than max_length keeps its last tokens."""
    if style not in ("letter", "cloze"):
        raise ValueError(f"style: expected 'letter' or 'cloze', got {style!r}")
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    model.eval()
    items = [(s, q) for s, qs in questions.items() for q in qs]
    texts = []
    for subject, q in items:
        solved = (shots or {}).get(subject, [])[:k]
        if len(solved) < k:
            raise DataError(f"{k}-shot: subject {subject!r} has {len(solved)} solved examples")
        texts.append((prompt if style == "letter" else cloze_prompt)(q, solved))
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    if style == "cloze":
        options = [[_continuation(tokenizer, t, f" {c.strip()}") for c in q.choices] for t, (_, q) in zip(texts, items)]
        room = [max_length - sum(map(len, o)) for o in options]
        encoded = [e[-max(r, 1):] for e, r in zip(encoded, room)]
    else:
        encoded = [e[-max_length:] for e in encoded]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    correct: dict[str, list[int]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if style == "cloze":
            picks = choice_picks(model, tokenizer, [encoded[i] for i in chunk], [options[i] for i in chunk],
                                 [[len(c.strip()) + 1 for c in items[i][1].choices] for i in chunk])
        else:
            picks = _letter_picks(model, tokenizer, [encoded[i] for i in chunk], [len(items[i][1].choices) for i in chunk])
        for i, pick in zip(chunk, picks):
            correct.setdefault(items[i][0], []).append(int(pick == items[i][1].answer))
    n = sum(len(v) for v in correct.values())
    return {"accuracy": sum(map(sum, correct.values())) / n if n else math.nan, "n": n, "style": style,
            "subjects": {s: sum(v) / len(v) for s, v in sorted(correct.items())}}


@torch.no_grad()
def _letter_picks(model, tokenizer, encoded: list[list[int]], counts: list[int]) -> list[int]:
    """The letter with the highest log-likelihood after each prompt (left-padded batch)."""
    letter_ids = torch.tensor(answer_tokens(tokenizer))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count from each prompt's start
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position).logits[:, -1, :].float()
    return [int(torch.log_softmax(logits[row], -1)[letter_ids[:count].to(device)].argmax().item())
            for row, count in enumerate(counts)]
