"""Pure-torch federated LoRA math (no nvflare import): stacking, averaging, merging."""
