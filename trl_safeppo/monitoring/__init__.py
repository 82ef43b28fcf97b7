"""Run monitoring: stage gates and early stops, held-out evaluation, probe prompts, progress, and the run report.

Every module here keeps torch / transformers / matplotlib imports inside functions, so the CLI stays fast.

- ``gates``: ``GateConfig`` (per-stage conditions), ``evaluate_gates`` (between stages), ``PlateauCallback`` and
  ``KLBudgetCallback`` (early stop inside a stage), ``gate_decision`` (``on_fail``: stop or carry the previous
  model over) and ``select_final`` (the run's final model: ``last`` or ``best_heldout``).
- ``evaluation``: ``evaluate_heldout`` (greedy generation on the held-out split, scored by the rule checker; with
  ``kl_reference``, the KL to that model along the answers, ``kl_along_answers``).
- ``probes``: ``validate_probes``, ``run_probes`` (greedy answers to fixed probe prompts).
- ``progress``: ``PipelineProgress`` (stage i of n; plain log lines when output is not a terminal).
- ``report``: ``write_report(run_dir)`` (report.md + plots/*.png); ``trl-safeppo report RUN_DIR``.
"""
