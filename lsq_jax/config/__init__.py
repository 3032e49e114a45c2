"""A run's settings: typed, frozen sections validated on construction, with their defaults in one place.

    task.py        TaskConfig (what to learn), CurriculumConfig, task_sizes (the token shapes)
    model.py       ModelConfig (the sequence model)
    optim.py       OptimConfig (the Adam recipe, or Levenberg-Marquardt)
    train.py       TrainConfig (the loop: batch, steps, logging, evaluation sizes, checkpoints)
    experiment.py  Experiment, and its one decoder (for a config and, rearranged, for a saved dict)
    defaults.py    base_config(): the ml_collections config every configs/*.py file starts from
    load.py        loading a config file and the --config flags
    check.py       ConfigError and the checks behind "section.field: got X; allowed Y"

Nothing here imports the rest of lsq_jax; import the modules themselves (no re-exports).
"""
