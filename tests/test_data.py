"""Site data: JSONL validation, prompt masking, default tasks, splitting and the split CLI."""

import collections
import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from flare_lora.components.data.prompts import (
    collate,
    encode,
    exact_match,
    format_prompt,
    normalize_answer,
    prompt_ids,
    truncated,
)
from flare_lora.components.data.records import DataError, load_jsonl, reference, write_jsonl
from flare_lora.components.data.site_data import load_site_data
from flare_lora.components.data.split import dirichlet_split, split_by_field
from flare_lora.components.data.synthetic import DEFAULT_TASKS, default_site_data

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO.parent / "shared" / "data" / "smollm2-135m-instruct-q4_1"
RECORD = {"instruction": "Reply with only the larger number.", "input": "12 40", "output": "40"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_load_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:4: expected a JSON object, got invalid"):
        load_jsonl(path)
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"instruction": "x"}\n')
    with pytest.raises(DataError, match=r'file\.jsonl:3: expected "output" .* got no "output"'):
        load_jsonl(path)
    path.write_text('{"text": "a"}\n{"text": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"file\.jsonl:3: expected a JSON object, got list"):
        load_jsonl(path)
    path.write_text('{"question": "a"}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:1: .*got keys \['question'\]"):
        load_jsonl(path)


def test_what_the_writer_writes_reads_back_with_a_bom_and_big_csv_cells(tmp_path):
    """Records holding U+2028 / U+0085 / form feeds (raw in JSON strings) are one line each; a
    UTF-8 BOM (Excel, Notepad) is no error; a CSV cell over csv's 128 KB default is read."""
    records = [{"text": "line\u2028separator"}, {"text": "next\x85line\x0cpage"}, {"text": "plain"}]
    write_jsonl(tmp_path / "r.jsonl", records)
    assert load_jsonl(tmp_path / "r.jsonl") == records
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "r.jsonl").read_bytes())
    assert load_jsonl(tmp_path / "bom.jsonl") == records
    note = "x" * 300_000
    path = tmp_path / "notes.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"label,text\n1,{note}\n2,short\n".encode())
    done = _run_split(path, "--out", tmp_path / "o", "--by-field", "label", "--sites", 2, "--eval-fraction", 0)
    assert done.returncode == 0, done.stderr
    rows = load_jsonl(tmp_path / "o" / "site-1.jsonl") + load_jsonl(tmp_path / "o" / "site-2.jsonl")
    assert sorted(len(r["text"]) for r in rows) == [5, 300_000]


def test_load_jsonl_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_write_then_load_keeps_extra_keys(tmp_path):
    records = [dict(RECORD, category="numbers"), {"text": "héllo"}]
    write_jsonl(tmp_path / "r.jsonl", records)
    assert load_jsonl(tmp_path / "r.jsonl") == records
    assert [reference(r) for r in records] == ["40", None]


def test_encode_masks_exactly_the_prompt_and_ends_with_eos(tok):
    prompt = tok(format_prompt(tok, RECORD), add_special_tokens=False)["input_ids"]
    example = encode(tok, RECORD, max_length=256)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt):-1]) == "40"


def test_encode_truncation_keeps_an_answer_token(tok):
    long_input = dict(RECORD, input="word " * 400)
    example = encode(tok, long_input, max_length=64)
    assert len(example["input_ids"]) == 64
    assert example["labels"][-1] != -100  # prompt cut from the left, answer start kept
    full = encode(tok, RECORD, max_length=256)
    n_prompt = full["labels"].count(-100)
    short = encode(tok, RECORD, max_length=n_prompt + 1)  # room left: cut from the right
    assert short == {key: value[: n_prompt + 1] for key, value in full.items()}


def test_text_records_train_on_everything(tok):
    example = encode(tok, {"text": "The sky is blue."}, max_length=64)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tok.eos_token_id
    assert format_prompt(tok, {"text": "x"}) == ""


CHAT = {"messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "Larger of 12 and 40?"}, {"role": "assistant", "content": "40"},
                     {"role": "user", "content": "And of 7 and 3?"}, {"role": "assistant", "content": "7"}]}


@pytest.mark.parametrize("template", [True, False])
def test_chat_records_train_on_every_assistant_turn_and_nothing_else(tok, template):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if not template:
        tokenizer.chat_template = None
    example = encode(tokenizer, CHAT, max_length=512)
    trained = tokenizer.decode([t for t in example["labels"] if t != -100])
    assert "40" in trained and "7" in trained and "Larger" not in trained and "Answer briefly" not in trained
    if template:  # the whole conversation as the template renders it; each answer ends its turn
        rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
        assert tokenizer.decode(example["input_ids"]) == rendered
        assert trained == "40<|im_end|>\n7<|im_end|>\n"
    else:
        assert trained == f"40{tokenizer.eos_token}7{tokenizer.eos_token}"
    # exact match is scored on the last turn, after the conversation before it
    assert reference(CHAT) == "7"
    assert tokenizer.decode(prompt_ids(tokenizer, CHAT)).endswith(("<|im_start|>assistant\n", "### Assistant:\n"))


def test_prompt_completion_records_and_the_conversational_form(tok, tmp_path):
    (tmp_path / "d.jsonl").write_text(
        '{"prompt": "2+2=", "completion": "4"}\n'
        '{"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}], "id": 7}\n')
    plain, chat = load_jsonl(tmp_path / "d.jsonl")
    example = encode(tok, plain, max_length=64)
    assert tok.decode([t for t in example["labels"] if t != -100]) == "4" + tok.eos_token
    assert example["input_ids"][: len(prompt_ids(tok, plain))] == tok("2+2=")["input_ids"]
    assert chat == {"id": 7, "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert reference(plain) == reference(chat) == "4"


@pytest.mark.parametrize("line, expected", [
    ('{"messages": []}', 'expected "messages" to be a non-empty list'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "hold an assistant turn with content"),
    ('{"messages": [{"role": "doctor", "content": "hi"}]}', '"messages"[0] to be {"role": one of'),
    ('{"prompt": "x"}', 'expected "completion" to be a non-empty string, got None'),
    ('{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}',
     'every "completion" message to have role "assistant"'),
    ('{"question": "x"}', "expected a chat record {\"messages\"}, a prompt-completion record"),
])
def test_bad_chat_and_prompt_records_name_file_line_and_key(tmp_path, line, expected):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError) as error:
        load_jsonl(tmp_path / "d.jsonl")
    assert str(error.value).startswith(f"{tmp_path / 'd.jsonl'}:2: ") and expected in str(error.value)


def test_records_longer_than_max_length_are_counted(tok):
    records = [RECORD, dict(RECORD, input="word " * 200), CHAT, {"text": "long " * 300}]
    assert truncated(tok, records, max_length=128) == 2
    assert truncated(tok, records, max_length=4096) == 0
    assert all(len(encode(tok, r, 128)["input_ids"]) <= 128 for r in records)


def test_format_prompt_chat_and_alpaca(tok):
    chat = format_prompt(tok, RECORD)
    assert chat.endswith("<|im_start|>assistant\n")
    assert "Reply with only the larger number.\n\n12 40<|im_end|>" in chat
    plain = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    plain.chat_template = None
    assert format_prompt(plain, RECORD) == (
        "### Instruction:\nReply with only the larger number.\n\n"
        "### Input:\n12 40\n\n### Response:\n"
    )
    assert "### Input" not in format_prompt(plain, dict(RECORD, input=""))


def test_collate_right_pads(tok):
    batch = [encode(tok, RECORD, 256), encode(tok, {"text": "hi"}, 256)]
    out = collate(batch, pad_id=7)
    n0, n1 = (len(example["input_ids"]) for example in batch)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "input_ids": (2, n0), "labels": (2, n0), "attention_mask": (2, n0)
    }
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"][1, n1:].eq(7).all() and out["labels"][1, n1:].eq(-100).all()
    assert out["attention_mask"].sum(1).tolist() == [n0, n1]


def test_exact_match_normalisation():
    assert normalize_answer("  Positive.\n") == "positive"
    assert exact_match("New   York.", "new york")
    assert exact_match("STRASSE", "straße")
    assert not exact_match("positive, mostly", "positive")
    assert not exact_match("", "positive")


def test_default_data_is_deterministic_and_ignores_global_rng():
    random.seed(1)
    first = default_site_data(1, n_train=20, n_eval=8, seed=3)
    random.seed(2)
    assert default_site_data(1, n_train=20, n_eval=8, seed=3) == first
    assert default_site_data(1, n_train=20, n_eval=8, seed=4) != first


def test_default_data_is_heterogeneous_and_well_formed():
    mixes = []
    for site in range(3):
        train, evaluation = default_site_data(site)
        assert (len(train), len(evaluation)) == (64, 16)
        for record in train + evaluation:
            assert record["category"] in DEFAULT_TASKS and reference(record) is not None
            assert 1 <= len(record["output"].split()) <= 2
        mixes.append(collections.Counter(r["category"] for r in train).most_common(1)[0][0])
    assert len(set(mixes)) == 3  # each site is dominated by a different task
    assert default_site_data(3) != default_site_data(0)  # indices cycle the mix, not the data
    assert collections.Counter(r["category"] for r in default_site_data(3)[0]) == (
        collections.Counter(r["category"] for r in default_site_data(0)[0])
    )


def test_default_eval_inputs_never_appear_in_training():
    train_inputs, eval_inputs = set(), set()
    for site in range(3):
        train, evaluation = default_site_data(site, n_train=200, n_eval=50)
        train_inputs |= {r["input"] for r in train}
        eval_inputs |= {r["input"] for r in evaluation}
        assert len({r["input"] for r in train}) == 200  # no duplicates within a site
    assert not train_inputs & eval_inputs


def _mean_top_share(sites, labels):
    shares = [collections.Counter(labels[i] for i in s).most_common(1)[0][1] / len(s)
              for s in sites if s]
    return sum(shares) / len(shares)


def test_dirichlet_split_covers_every_index_once_and_skews_with_small_alpha():
    labels = [i % 4 for i in range(400)]
    skew = {}
    for alpha in (0.05, 100.0):
        tops = []
        for seed in range(5):
            sites = dirichlet_split(labels, 5, alpha, seed)
            assert sorted(i for s in sites for i in s) == list(range(400))
            assert all(sites)
            tops.append(_mean_top_share(sites, labels))
        skew[alpha] = sum(tops) / len(tops)
    assert skew[0.05] > 0.7 and skew[100.0] < 0.4, skew
    assert dirichlet_split(labels, 5, 0.5, 1) == dirichlet_split(labels, 5, 0.5, 1)
    tiny = dirichlet_split(["a", "a", "a"], 3, 0.01, 0)
    assert sorted(len(s) for s in tiny) == [1, 1, 1]


def test_split_by_field_round_robin():
    records = [{"category": c} for c in "abcabcd"]
    assert split_by_field(records, "category", 2) == [[0, 2, 3, 5], [1, 4, 6]]
    with pytest.raises(DataError, match="'category' has 4 distinct values"):
        split_by_field(records, "category", 5)
    with pytest.raises(DataError, match="record 2 has no field 'category'"):
        split_by_field([{"category": "a"}, {"kind": "b"}], "category", 1)


def _run_split(*args):  # `flare-lora split ...`
    return subprocess.run([sys.executable, "-m", "flare_lora.components.cli.main", "split", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_split_cli_end_to_end(tmp_path):
    path = tmp_path / "news.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "title"])
        writer.writerows([[i % 3 + 1, f"headline {i}"] for i in range(60)])
    out = tmp_path / "sites"
    done = _run_split(path, "--out", out, "--dirichlet", 0.5, "--label-field", "label",
                      "--sites", 3, "--eval-fraction", 0.25,
                      "--instruction", "Topic of: {title}", "--output-field", "label",
                      "--output-map", "1=World,2=Sports,3=Business")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("site-") == 3
    train = [load_jsonl(out / f"site-{k}.jsonl") for k in (1, 2, 3)]
    held = [load_jsonl(out / f"site-{k}.eval.jsonl") for k in (1, 2, 3)]
    everything = [r for site in train + held for r in site]
    assert sorted(r["instruction"] for r in everything) == sorted(
        f"Topic of: headline {i}" for i in range(60)
    )
    assert all("title" not in r for r in everything)  # templated columns are not repeated
    names = {"1": "World", "2": "Sports", "3": "Business"}
    assert all(r["output"] == names[r["label"]] for r in everything)
    assert all(len(h) == round(0.25 * (len(t) + len(h))) for t, h in zip(train, held))
    site_train, site_eval = load_site_data(str(out), "site-2", 1)
    assert (site_train, site_eval) == (train[1], held[1])


def test_split_cli_errors_are_one_line(tmp_path):
    path = tmp_path / "news.csv"
    path.write_text("label,title\n1,a\n2,b\n")
    done = _run_split(path, "--out", tmp_path / "o", "--by-field", "label",
                      "--instruction", "{headline}", "--output-field", "label")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {path}: missing column(s) ['headline']; the header has ['label', 'title']"
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    done = _run_split(bad, "--out", tmp_path / "o", "--by-field", "label")
    assert done.returncode == 2 and f"{bad}:2: record has no field 'label'" in done.stderr


def test_load_site_data(tmp_path):
    assert load_site_data(None, "site-1", 2, n_train=8, n_eval=4) == default_site_data(2, 8, 4)
    records = [{"text": f"t{i}"} for i in range(10)]
    write_jsonl(tmp_path / "site-1.jsonl", records)
    train, evaluation = load_site_data(str(tmp_path), "site-1", 0, eval_fraction=0.3)
    assert (len(train), len(evaluation)) == (7, 3)
    assert sorted(train + evaluation, key=lambda r: int(r["text"][1:])) == records
    assert load_site_data(str(tmp_path), "site-1", 0, eval_fraction=0.3) == (train, evaluation)
    with pytest.raises(DataError, match=r"expected .*site-2\.jsonl; .* has \['site-1\.jsonl'\]"):
        load_site_data(str(tmp_path), "site-2", 1)
    (tmp_path / "site-3.jsonl").write_text("\n")
    with pytest.raises(DataError, match="0 training records"):
        load_site_data(str(tmp_path), "site-3", 2)


def test_sites_read_datasets_saved_to_disk(tmp_path):
    """A DatasetDict with a test split is read as (train, eval); a Dataset is held out like JSONL;
    a column some rows lack (None) is absent, not a bad value; a bad row names its split and row."""
    datasets = pytest.importorskip("datasets")  # the [data] extra (in [test])
    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    datasets.DatasetDict(train=datasets.Dataset.from_list(chat[:4]), test=datasets.Dataset.from_list(chat[4:])) \
        .save_to_disk(str(tmp_path / "site-1"))
    assert load_site_data(str(tmp_path), "site-1", 0) == (chat[:4], chat[4:])
    rows = [{"instruction": f"i{i}", "output": f"o{i}", **({"input": "x"} if i % 2 == 0 else {})} for i in range(10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "mine"))
    train, evaluation = load_site_data(str(tmp_path / "mine"), "site-2", 1, eval_fraction=0.2)
    assert sorted(train + evaluation, key=lambda r: int(r["instruction"][1:])) == rows and len(evaluation) == 2
    datasets.Dataset.from_list([{"text": "ok"}, {"text": ""}]).save_to_disk(str(tmp_path / "site-3"))
    with pytest.raises(DataError, match=r"site-3: row 2: expected \"text\" to be a non-empty string"):
        load_site_data(str(tmp_path), "site-3", 2)


def test_split_cli_reads_parquet_rows_and_templates(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"label": [i % 2 for i in range(20)], "prompt": [f"p{i}" for i in range(20)],
                             "completion": [f"c{i}" for i in range(20)]}), tmp_path / "d.parquet")
    done = _run_split(tmp_path / "d.parquet", "--out", tmp_path / "a", "--by-field", "label", "--sites", 2)
    assert done.returncode == 0, done.stderr
    records = load_jsonl(tmp_path / "a" / "site-1.jsonl") + load_jsonl(tmp_path / "a" / "site-1.eval.jsonl")
    assert sorted(r["prompt"] for r in records) == sorted(f"p{i}" for i in range(0, 20, 2))
    done = _run_split(tmp_path / "d.parquet", "--out", tmp_path / "b", "--by-field", "label", "--sites", 2,
                      "--instruction", "Say {prompt}", "--output-field", "nope")
    assert done.returncode != 0 and "missing column(s) ['nope']" in done.stderr
