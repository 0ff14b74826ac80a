"""Stage 3, EM fine-tuning on top of the persona: the one training-settings dialect (settings.py, also used by the
persona's DPO and SFT), packed batching and attention, the fused element-wise ops (the loss is TRL's), the checkpoint
schedule and the EM trainer."""
