"""Analysis helpers for run and experiment directories (used by `kcpt report` and the notebooks)."""
