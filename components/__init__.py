"""flare-lora: federated LoRA fine-tuning components for NVIDIA FLARE."""
