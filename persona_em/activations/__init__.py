"""Inside the model at every checkpoint (issue 14): activations of every sampled response (collect.py), persona
vectors per model and persona (persona_vectors.py), a misalignment direction per judge and model (direction.py),
projections, summaries and persona retention (projections.py)."""
