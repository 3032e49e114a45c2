"""Evaluation in numerical-analysis units: `solvers` (every least-squares method behind one interface,
and the harness), `constructions` (the hand-built GD models as solvers), `stats` (errors, floors,
contractions, their JSON form), `report` (iterated, single-step, a model's or the constructions' report,
written into a workdir), `ood` (the out-of-distribution grid), `table` (the terminal table) and `plots`
(PNGs, the metrics.jsonl reader, `python -m lsq_jax.eval.plots <workdir>`)."""
