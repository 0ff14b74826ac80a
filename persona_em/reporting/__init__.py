"""Stage 7, figures, drawn only from the tables (one function per figure)."""
