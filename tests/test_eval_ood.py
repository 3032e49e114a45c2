"""lsq_jax.eval.ood: the cells of the out-of-distribution grid."""
from lsq_jax.eval.ood import ood_cells


def test_ood_cells():
    cells = ood_cells(5, 20, kappa=1.0, scale_target=1.0)
    assert cells[0] == {"axis": "kappa_scale", "kappa": 1.0, "scale_target": 1.0, "n_points": 20, "n_dims": 5}
    assert sum(c["axis"] == "kappa_scale" for c in cells) == 15
    assert [c["n_points"] for c in cells if c["axis"] == "rows"] == [10, 15]
    assert [c["n_dims"] for c in cells if c["axis"] == "dims"] == [3, 4]
    # an in-distribution cell off the grid is added first; rows below D are not allowed
    cells = ood_cells(5, 8, kappa=3.0, scale_target=1.0, kappas=(1.0,), scales=(1.0,))
    assert [c["kappa"] for c in cells if c["axis"] == "kappa_scale"] == [3.0, 1.0]
    assert [c["n_points"] for c in cells if c["axis"] == "rows"] == [6]
