"""Stage 1, inputs: EM training datasets (fetch, check, compose) and evaluation question files."""
