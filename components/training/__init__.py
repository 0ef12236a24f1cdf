"""Client-side training: model loading, LoRA setup, local train/eval loop."""
