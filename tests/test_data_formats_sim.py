"""End to end: sites whose data is chat (`messages`) and prompt-completion JSONL train in a real
FLARE simulator job, records longer than max_length are counted per site, and --eval scores
multiple-choice questions every round at every site."""

import json

import pytest
from sim_jobs import run_job

from flare_lora.components.data.records import write_jsonl


@pytest.mark.e2e
def test_chat_and_prompt_completion_sites_train_and_report_truncation(tmp_path, tiny_model_dir):
    chat = [{"messages": [{"role": "user", "content": f"Add {i} and 1."}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(10)]
    chat.append({"messages": [{"role": "user", "content": "Summarise: " + "long clinical note " * 60},
                              {"role": "assistant", "content": "A long note."}]})
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "site-1.jsonl", chat)
    write_jsonl(data / "site-2.jsonl", [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(10)])
    config = tmp_path / "sites.json"
    config.write_text(json.dumps({"site-1": {"max_length": 64}, "site-2": {"max_length": 64}}))
    mc = tmp_path / "mc.jsonl"
    write_jsonl(mc, [{"question": f"{i} + 1 = ?", "choices": [str(i), str(i + 1), "0"], "answer": 1} for i in range(5)])
    log, _, proc = run_job(tmp_path, tiny_model_dir, "--ranks", "2,2", "--rounds", "1", "--data", str(data),
                           "--site-config", str(config), "--steps", "3", "--eval", str(mc), "--eval-style", "cloze")
    sites = log["rounds"][0]["sites"]
    assert sites["site-1"]["train"]["truncated"] == 1 and sites["site-2"]["train"]["truncated"] == 0
    assert all(entry["train"]["train_loss"] > 0 for entry in sites.values())
    final = log["final"]["sites"]
    assert all("exact_match" in final[s]["metrics"] for s in ("site-1", "site-2"))  # scored on the last turn / completion
    for record in (log["rounds"][0], log["final"]):  # the global model of each round, at each site
        assert all(entry["metrics"]["mc_n"] == 5 and 0 <= entry["metrics"]["mc_accuracy"] <= 1
                   for entry in record["sites"].values())
    assert "mc_acc" in proc.stdout
    assert "records longer than max_length (cut in training): site-1 1" in proc.stdout
