"""Training: the stage loop and its pure parts.

- :mod:`kcpt.train.losses`     token CE and KL(p_ref ‖ p_θ) as (sum, count) pairs for token-weighted means
- :mod:`kcpt.train.schedule`   warmup + cosine LR multiplier
- :mod:`kcpt.train.stopping`   plateau / exam / gate / max_steps stop rules (JSON-serialisable state)
- :mod:`kcpt.train.anomaly`    anomaly rule (non-finite loss, grad-norm spike) and the in-memory stable snapshot
- :mod:`kcpt.train.mixture`    seeded, resumable choice of the source of each micro-batch
- :mod:`kcpt.train.checkpoint` atomic checkpoint directories, manifest, compatibility checks, pruning
"""
