"""Multiple-choice evaluation by letter log-likelihood (MMLU as lm-evaluation-harness asks it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flare_lora.components.data.records import DataError
from flare_lora.components.training.models import load_model_and_tokenizer
from flare_lora.components.training.multiple_choice import (
    LETTERS,
    Question,
    accuracy,
    check_source,
    load_questions,
    load_shots,
    prompt,
)

MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"


def test_mmlu_folder_loads_every_subject_and_the_prompt_is_lm_eval_harness():
    questions = load_questions(str(MMLU), limit=2)
    shots = load_shots(str(MMLU))
    assert len(questions) == 57 and all(len(q) == 2 for q in questions.values())
    assert sum(len(q) for q in load_questions(str(MMLU)).values()) == 14042
    assert all(len(s) == 5 for s in shots.values())
    q = Question("high_school_physics", " What moves? ", ("a", "b", "c", "d"), 2)
    solved = Question("high_school_physics", "Which is fast?", ("x", "y", "z", "w"), 1)
    assert prompt(q, [solved]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Which is fast?\nA. x\nB. y\nC. z\nD. w\nAnswer: B\n\n"
        "What moves?\nA. a\nB. b\nC. c\nD. d\nAnswer:")


def test_batched_left_padded_scores_equal_one_question_at_a_time(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    questions = {s: qs for s, qs in list(load_questions(str(MMLU), limit=3).items())[:4]}
    shots = load_shots(str(MMLU))
    result = accuracy(model, tokenizer, questions, shots=shots, k=1, batch_size=5)
    hits = []
    for subject, qs in questions.items():
        for q in qs:
            ids = tokenizer(prompt(q, shots[subject][:1]))["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            letters = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"][0] for x in LETTERS[:4]]
            hits.append(int(logits[letters].argmax().item() == q.answer))
    assert result["n"] == 12 and result["accuracy"] == pytest.approx(sum(hits) / 12)


def test_cloze_scores_every_choice_in_one_pass_as_if_each_ran_alone(tiny_model_dir):
    """The packed pass (context, then every choice attending to the context and itself) picks what
    scoring each context + choice separately picks, per character, with and without shots."""
    from flare_lora.components.training.multiple_choice import _continuation, cloze_prompt

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    questions = {s: qs for s, qs in list(load_questions(str(MMLU), limit=2).items())[:6]}
    shots = load_shots(str(MMLU))
    for k in (0, 2):
        hits = []
        for subject, qs in questions.items():
            for q in qs:
                text = cloze_prompt(q, shots[subject][:k])
                context = tokenizer(text)["input_ids"]
                scores = []
                for choice in q.choices:
                    tokens = _continuation(tokenizer, text, f" {choice.strip()}")
                    with torch.no_grad():
                        logp = torch.log_softmax(model(input_ids=torch.tensor([context + tokens])).logits[0], -1)
                    scores.append(sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(tokens)) / (len(choice.strip()) + 1))
                hits.append(int(max(range(len(scores)), key=scores.__getitem__) == q.answer))
        result = accuracy(model, tokenizer, questions, shots=shots, k=k, batch_size=4, style="cloze")
        assert result["n"] == 12 and result["accuracy"] == pytest.approx(sum(hits) / 12), k


def test_bad_questions_name_file_line_and_site(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(DataError, match=r"mc\.jsonl:2: expected 2 to 10 string choices"):
        load_questions(str(path))
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(DataError, match=r"mc\.jsonl:1: expected answer to be a choice index 0..1, got 2"):
        load_questions(str(path))
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1, "subject": "triage"}\n')
    with pytest.raises(DataError, match="site 'site-1': key 'eval_mc_shots': 5-shot .* subject 'triage' has 0"):
        check_source(str(path), None, 5, "site 'site-1'")
    (tmp_path / "mc.dev.jsonl").write_text('{"question": "p", "choices": ["c", "d"], "answer": 0, "subject": "triage"}\n')
    check_source(str(path), None, 1, "site 'site-1'")
    with pytest.raises(DataError, match="site 'site-1': key 'eval_mc': multiple-choice data not found"):
        check_source(str(tmp_path / "none.jsonl"), None, 0, "site 'site-1'")


def test_eval_command_scores_the_base_model_and_writes_json(tmp_path, tiny_model_dir):
    out = tmp_path / "mc.json"
    done = subprocess.run([sys.executable, "-m", "flare_lora.components.cli.main", "eval", "--model", str(tiny_model_dir),
                           "--mc", str(MMLU), "--limit", "1", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "0-shot letter accuracy" in done.stdout and "on 57 questions (57 subjects)" in done.stdout
    result = json.loads(out.read_text())
    assert result["n"] == 57 and 0 <= result["accuracy"] <= 1 and len(result["subjects"]) == 57
