"""Stage 3, EM fine-tuning on top of the persona: the one training-settings dialect (settings.py, also used by the
persona's DPO and SFT), packed batching and attention, the fused loss, the checkpoint schedule and the EM trainer."""
