"""What a run is, decided once from the experiment (and, for training, the mesh): `report.py`
(`ReportPlan`: the task, the model, the evaluation's key and sizes, the report's memory), `run.py`
(`RunPlan`: the report's part and every size of training, the optimizer, the keys), `memory.py` (the
lower-bound memory estimates and their checks). Training, evaluation and the benchmarks read a plan; none
of them builds a task, a model or an optimizer again."""
