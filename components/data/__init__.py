"""Site data: JSONL loading, embedded default tasks, splitting, prompt encoding."""
