"""The model: loading (load.py), GPT-J's packed-aware attention, the speed kernels, the fused loss
head, torch.compile, the methods (full, LoRA, prompt tuning) and trained models loaded back."""
