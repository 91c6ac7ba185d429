"""Ray Tune + Optuna search over the stage-3 mixture, learning rate and KL weight, with the gate as objective.

Public API: :func:`kcpt.tune.launch.tune_stage3` (the job), :func:`kcpt.tune.space.apply_params`,
:class:`kcpt.tune.searcher.ConstrainedOptunaSearch`, :func:`kcpt.tune.objective.gate_outcome`,
:func:`kcpt.tune.export.export_results`.
"""
