"""Stage 4, per-checkpoint sampling: the composed model answers the evaluation questions (fast static-cache decoding,
persistent compile cache)."""
