"""Training: `archgen train RECIPE` (loop.py), recipes (recipe.py, checks.py), data and tokenizers, checkpoints,
metrics, processes (distributed.py) and `archgen generate` (generate.py)."""
