"""lsq_jax.eval.ood: the cells of the generality grid and whether each lies inside the trained range."""
from lsq_jax.config.task import TaskConfig
from lsq_jax.eval.ood import TrainedRange, ood_cells, trained_range


def _axis(cells, axis, field):
    return [c[field] for c in cells if c["axis"] == axis]


def test_ood_cells_of_a_single_size():
    cells = ood_cells(TrainedRange((20,), (1.0, 1.0), (1.0, 1.0), 5))
    assert cells[0] == {"axis": "in_distribution", "kappa": 1.0, "scale_target": 1.0, "n_points": 20,
                        "n_dims": 5, "in_range": True}
    assert _axis(cells, "kappa", "kappa") == [10.0, 100.0, 1000.0]
    assert _axis(cells, "scale", "scale_target") == [0.01, 0.1, 10.0, 100.0]
    assert _axis(cells, "rows", "n_points") == [10, 15]  # L + 2 = 22 is longer than the model reads
    assert _axis(cells, "dims", "n_dims") == [3, 4]
    assert not any(c["in_range"] for c in cells[1:])
    # the model reads 22 rows: the longer problems join; rows below D are never drawn
    cells = ood_cells(TrainedRange((8,), (3.0, 3.0), (1.0, 1.0), 5), max_rows=10, kappas=(1.0,), scales=(1.0,))
    assert cells[0]["kappa"] == 3.0 and _axis(cells, "kappa", "kappa") == [1.0]
    assert _axis(cells, "rows", "n_points") == [6, 10]


def test_ood_cells_of_a_trained_range():
    """Every trained L, fewer rows and more; the ranges' ends join the kappa and scale axes; the reference
    is the smallest kappa and the scale of the range nearest 1."""
    trained = trained_range(TaskConfig(n_dims=3, n_points=12, n_points_min=6, scale_cond_max=100.0,
                                       scale_target=0.1, scale_target_max=10.0))
    assert trained == TrainedRange(tuple(range(6, 13)), (1.0, 100.0), (0.1, 10.0), 3)
    cells = ood_cells(trained, max_rows=14)
    assert cells[0]["kappa"] == 1.0 and cells[0]["scale_target"] == 1.0 and cells[0]["n_points"] == 12
    rows = {c["n_points"]: c["in_range"] for c in cells if c["axis"] == "rows"}
    assert rows == {3: False, 5: False, 6: True, 7: True, 8: True, 9: True, 10: True, 11: True, 14: False}
    kappas = {c["kappa"]: c["in_range"] for c in cells if c["axis"] == "kappa"}
    assert kappas == {10.0: True, 100.0: True, 1000.0: False}
    scales = {c["scale_target"]: c["in_range"] for c in cells if c["axis"] == "scale"}
    assert scales == {0.01: False, 0.1: True, 10.0: True, 100.0: False}
    assert not any(c["in_range"] for c in cells if c["axis"] == "dims")


def test_every_prefix_is_trained_for_a_causal_model_with_setting_all():
    cfg = TaskConfig(n_dims=3, n_points=10, setting="all")
    assert trained_range(cfg, causal=True).prefixes and not trained_range(cfg, causal=False).prefixes
    cells = ood_cells(trained_range(cfg, causal=True))
    assert {c["n_points"]: c["in_range"] for c in cells if c["axis"] == "rows"} == {5: True, 8: True}
    cells = ood_cells(trained_range(cfg, causal=False))
    assert {c["n_points"]: c["in_range"] for c in cells if c["axis"] == "rows"} == {5: False, 8: False}
