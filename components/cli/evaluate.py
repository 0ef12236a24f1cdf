"""``flare-lora eval``: multiple-choice accuracy (MMLU style, by log-likelihood) of the base model or
of a finished job's model, in one command.

    flare-lora eval --mc ../shared/data/mmlu                      # the default model, 0-shot, all 14,042 questions
    flare-lora eval --mc ../shared/data/mmlu --style cloze        # the format SmolLM2's reported MMLU numbers use
    flare-lora eval results/flora --mc ../shared/data/mmlu --shots 5 --limit 20
    flare-lora eval --model /models/llama --mc site_questions.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from flare_lora.components.data.records import DataError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flare-lora eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", nargs="?", help="a job's results folder: evaluate its model (default: the base model)")
    p.add_argument("--model", default=None, help="base model dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--mc", required=True, metavar="PATH",
                   help="an MMLU folder (test/ and dev/ CSVs) or a JSONL of {question, choices, answer, subject}")
    p.add_argument("--shots", type=int, default=0, help="solved examples before each question (MMLU: 0 or 5)")
    p.add_argument("--style", choices=["letter", "cloze"], default="letter",
                   help="letter: lettered choices, the letter's log-likelihood (lm-eval-harness' mmlu); cloze: the "
                        "question alone, each choice's log-likelihood per character (mmlu_continuation, SmolLM2's reports)")
    p.add_argument("--limit", type=int, default=None, help="first N questions per subject (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result, per subject, as JSON")
    args = p.parse_args(argv)
    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        print("error: --shots must be >= 0 and --limit >= 1", file=sys.stderr)
        return 2
    import torch

    from flare_lora.components.loading import load
    from flare_lora.components.training.models import load_model_and_tokenizer, resolve_model_dir
    from flare_lora.components.training.multiple_choice import accuracy, load_questions, load_shots

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        questions = load_questions(args.mc, limit=args.limit)
        shots = load_shots(args.mc) if args.shots else {}
        if args.results_dir:
            model, tokenizer = load(args.results_dir, base_model=args.model)
        else:
            model, tokenizer = load_model_and_tokenizer(resolve_model_dir(args.model))
        start = time.time()
        result = accuracy(model, tokenizer, questions, shots=shots, k=args.shots, batch_size=args.batch_size,
                          style=args.style)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = args.results_dir or args.model or "the default model"
    print(f"{what}: {args.shots}-shot {args.style} accuracy {result['accuracy']:.4f} on {result['n']} questions "
          f"({len(result['subjects'])} subjects) from {args.mc}, {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**result, "model": what, "shots": args.shots, "source": args.mc, "limit": args.limit,
                       "seconds": round(time.time() - start, 1)}, f, indent=1)
    return 0
