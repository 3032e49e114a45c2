"""Tasks against the reference's saved tensors and against plain numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsq_jax.config.task import PRIMITIVE_NAMES, TASK_NAMES, CurriculumConfig, TaskConfig
from lsq_jax.data import lsq
from lsq_jax.data.samplers import LeastSquaresSample, example_keys
from lsq_jax.data.tasks import curriculum_value, make_task

TOL = dict(rtol=0, atol=1e-12)

# (reference prefix, TaskConfig kwargs) for the tasks whose reference behaviour we reproduce.
REF_PRIMITIVES = ["identity", "square", "elementwise_multiply", "read", "linear", "linear_sparse2"]
REF_LEAST_SQUARES = {
    "least_squares": dict(name="least_squares"),
    "least_squares_icl_neighboring": dict(name="least_squares_icl", setting="neighboring"),
    "least_squares_icl_concat": dict(name="least_squares_icl", setting="concat"),
    "explicit_gradient_last": dict(name="explicit_gradient", setting="last"),
    "multistep_gd": dict(name="multistep_gd", num_iters=4, eta=0.5),
}

# Every task and setting.
ALL_CONFIGS = [
    dict(name="identity"),
    dict(name="square"),
    dict(name="elementwise_multiply"),
    dict(name="read"),
    dict(name="linear"),
    dict(name="linear", sparsity=1),
    dict(name="least_squares"),
    dict(name="least_squares_icl", setting="neighboring"),
    dict(name="least_squares_icl", setting="concat"),
    dict(name="explicit_gradient", setting="last"),
    dict(name="explicit_gradient", setting="all"),
    dict(name="multistep_gd", num_iters=3, eta=0.3),
]


def _id(kwargs):
    return "-".join(str(v) for v in kwargs.values())


@pytest.fixture(scope="module")
def ref(reference_dir):
    return dict(np.load(reference_dir / "tasks.npz"))


def _ref_ls_sample(ref, prefix="ls_sample"):
    return LeastSquaresSample(
        a=ref[f"{prefix}/A"],
        b=ref[f"{prefix}/b"],
        x_star=ref[f"{prefix}/x_star"][..., 0],  # the reference stores (B, D, 1)
        x0=ref[f"{prefix}/x0"],
    )


def _check_metrics(task, ref, prefix, targets):
    pred = jnp.asarray(ref[f"{prefix}/pred"])
    pointwise = ref[f"{prefix}/pointwise_metric"]
    np.testing.assert_allclose(task.pointwise_error(pred, targets), pointwise, **TOL)
    np.testing.assert_allclose(task.loss(pred, targets), ref[f"{prefix}/training_metric"], rtol=1e-14)


# -- the reference's saved tensors ---------------------------------------------------------------------


@pytest.mark.parametrize("prefix", REF_PRIMITIVES)
def test_primitives_match_reference(ref, prefix):
    name = "linear" if prefix.startswith("linear") else prefix
    kwargs = dict(sparsity=2) if prefix == "linear_sparse2" else {}
    cfg = TaskConfig(name, n_dims=6, n_points=7, **kwargs)
    overrides = {}
    if name == "read":
        overrides["read_pair"] = (int(ref["read/i"]), int(ref["read/j"]))
    if name == "linear":
        overrides["linear_coef"] = ref[f"{prefix}/c"]
    task = make_task(cfg, **overrides)
    inputs, targets = task.build(ref["gaussian/x"])
    np.testing.assert_allclose(inputs, ref[f"{prefix}/in"], **TOL)
    np.testing.assert_allclose(targets, ref[f"{prefix}/out"], **TOL)
    _check_metrics(task, ref, prefix, targets)


def test_read_second_reference_pair(ref):
    pair = (int(ref["read_seed5/i"]), int(ref["read_seed5/j"]))
    task = make_task(TaskConfig("read", n_dims=6, n_points=7), read_pair=pair)
    np.testing.assert_allclose(task.build(ref["gaussian/x"])[1], ref["read_seed5/out"], **TOL)


@pytest.mark.parametrize("prefix", list(REF_LEAST_SQUARES))
def test_least_squares_family_matches_reference(ref, prefix):
    task = make_task(TaskConfig(n_dims=4, n_points=7, **REF_LEAST_SQUARES[prefix]))
    inputs, targets = task.build(_ref_ls_sample(ref))
    np.testing.assert_allclose(inputs, ref[f"{prefix}/in"], **TOL)
    out = ref[f"{prefix}/out"]
    # explicit_gradient 'last': the reference stores (B, D) and compares with out[:, None].
    np.testing.assert_allclose(targets, out[:, None] if prefix == "explicit_gradient_last" else out, **TOL)
    _check_metrics(task, ref, prefix, targets)


def test_multistep_gd_iterates_match_reference(ref):
    sample = _ref_ls_sample(ref)
    for k, x_k in enumerate(ref["multistep_gd/iterates"], start=1):
        task = make_task(TaskConfig("multistep_gd", n_dims=4, n_points=7, num_iters=k, eta=0.5))
        np.testing.assert_allclose(task.build(sample)[1][:, 0], x_k, **TOL)


def test_explicit_gradient_all_is_the_reference_shifted_one_position(ref):
    """Ours: the target at output position j + 1 is the reference's row j (the same numbers, read one
    position later, where a causal model has seen rows 1..j+1)."""
    task = make_task(TaskConfig("explicit_gradient", n_dims=4, n_points=7, setting="all"))
    inputs, targets = task.build(_ref_ls_sample(ref))
    np.testing.assert_allclose(inputs, ref["explicit_gradient_all/in"], **TOL)
    positions = task.target_positions()
    assert positions == tuple(range(1, 8))
    out = ref["explicit_gradient_all/out"]
    for j in range(7):
        assert positions[j] == j + 1
        np.testing.assert_allclose(targets[:, j], out[:, j], **TOL)
    pred = ref["explicit_gradient_all/pred"]
    # The reference reads pred[:, :L]; ours reads pred[:, 1:L+1].
    ref_metric = ref["explicit_gradient_all/training_metric"]
    np.testing.assert_allclose(np.mean((pred[:, :7, :4] - out) ** 2), ref_metric, rtol=1e-14)
    ours = (pred[:, 1:, :4] - out) ** 2
    np.testing.assert_allclose(task.loss(jnp.asarray(pred), targets), ours.mean(), rtol=1e-14)
    np.testing.assert_allclose(task.pointwise_error(jnp.asarray(pred), targets), ours, **TOL)
    assert not np.isclose(ours.mean(), ref_metric)


def test_reference_truncated_and_kappa_samples(ref):
    """Tasks on the reference's truncated and kappa-5 samples: the same formulas hold."""
    for prefix in ("ls_sample_trunc3", "ls_sample_kappa5"):
        sample = _ref_ls_sample(ref, prefix)
        task = make_task(TaskConfig("explicit_gradient", n_dims=4, n_points=7))
        a, b, x0 = sample.a, sample.b, sample.x0
        grad = np.einsum("bld,bl->bd", a, np.einsum("bld,bd->bl", a, x0) - b) / 7
        np.testing.assert_allclose(task.build(sample)[1][:, 0], grad, **TOL)
    trunc = _ref_ls_sample(ref, "ls_sample_trunc3")
    full = _ref_ls_sample(ref)
    # The reference's truncation: same draws, coordinates >= 3 zeroed, b formed from the truncated A, x*.
    for field in ("a", "x_star", "x0"):
        np.testing.assert_array_equal(getattr(trunc, field)[..., 3:], 0)
        np.testing.assert_allclose(getattr(trunc, field)[..., :3], getattr(full, field)[..., :3], **TOL)
    b = np.einsum("bld,bd->bl", full.a[..., :3], full.x_star[..., :3])
    np.testing.assert_allclose(trunc.b, b, **TOL)


# -- numpy formulas on our own samples ---------------------------------------------------------------


def _numpy_inputs_targets(cfg, task, raw):
    """Independent, loop-based numpy statement of the reference's"""
    d = cfg.n_dims
    if cfg.name in PRIMITIVE_NAMES:
        x = np.asarray(raw)
        bsz, n = x.shape[:2]
        if cfg.name == "identity":
            y = x.copy()
        elif cfg.name == "square":
            y = x * x
        elif cfg.name == "elementwise_multiply":
            y = x[..., : d // 2] * x[..., d // 2:]
        elif cfg.name == "read":
            i, j = task.pair
            y = x.copy()
            y[:, j] = x[:, i]
        else:
            c = np.asarray(task.coef)
            y = np.zeros((bsz, n, 1))
            for k in range(d):
                y[..., 0] += x[..., k] * c[k]
        return x, y
    a, b, x_star, x0 = (np.asarray(v) for v in raw)
    bsz, n, _ = a.shape

    def grad(rows, x):  # sum over the given rows of a_i (a_i . x - b_i), divided by their number
        g = np.zeros((bsz, d))
        for i in rows:
            g += a[:, i] * (np.sum(a[:, i] * x, axis=-1) - b[:, i])[:, None]
        return g / len(rows)

    tokens = np.concatenate([a, b[..., None]], axis=-1)
    x0_token = np.concatenate([x0, np.zeros((bsz, 1))], axis=-1)[:, None]
    if cfg.name == "least_squares":
        return tokens, x_star[:, None]
    if cfg.name == "least_squares_icl" and cfg.setting == "neighboring":
        inputs = np.zeros((bsz, 2 * n - 1, d + 1))
        for i in range(n):
            inputs[:, 2 * i, :d] = a[:, i]
            if i < n - 1:
                inputs[:, 2 * i + 1, d] = b[:, i]
        return inputs, b[..., None]
    if cfg.name == "least_squares_icl":
        inputs = tokens.copy()
        inputs[:, -1, d] = 0
        return inputs, b[:, -1:, None]
    if cfg.name == "explicit_gradient":
        inputs = np.concatenate([x0_token, tokens], axis=1)
        if cfg.setting == "last":
            return inputs, grad(range(n), x0)[:, None]
        return inputs, np.stack([grad(range(j), x0) for j in range(1, n + 1)], axis=1)
    x = x0.copy()
    for _ in range(cfg.num_iters):
        x = x - cfg.eta * grad(range(n), x)
    return np.concatenate([tokens, x0_token], axis=1), x[:, None]


@pytest.mark.parametrize("kwargs", ALL_CONFIGS, ids=_id)
@pytest.mark.slow
def test_targets_against_numpy(kwargs):
    for n_dims, n_points in [(2, 1), (4, 7), (6, 3)]:
        cfg = TaskConfig(n_dims=n_dims, n_points=n_points, **kwargs)
        task = make_task(cfg)
        batch = task.sample(example_keys(jax.random.key(1), 0, 0, 4))
        inputs, targets = _numpy_inputs_targets(cfg, task, batch.raw)
        np.testing.assert_allclose(batch.inputs, inputs, **TOL)
        np.testing.assert_allclose(batch.targets, targets, **TOL)
        assert batch.inputs.shape == (4, task.seq_len(), task.in_dims)
        assert batch.targets.shape[1] == len(task.target_positions())
        # sample() is draw then build: build on the raw sample gives the same.
        rebuilt = task.build(batch.raw)
        np.testing.assert_allclose(rebuilt[0], batch.inputs, **TOL)
        np.testing.assert_allclose(rebuilt[1], batch.targets, **TOL)


@pytest.mark.parametrize("kwargs", ALL_CONFIGS, ids=_id)
def test_read_slice_and_metrics(kwargs):
    """read(pred) picks target_positions and the right channels of a (B, T, width) output."""
    task = make_task(TaskConfig(n_dims=4, n_points=7, **kwargs))
    targets = task.sample(example_keys(jax.random.key(2), 0, 0, 4)).targets
    width = task.out_dims + 2  # a wider model output than needed
    t_len = task.seq_len()
    pred = np.random.default_rng(0).normal(size=(4, t_len, width))
    positions = task.target_positions()
    n_channels = targets.shape[-1]
    # ICL reads the LAST channel; every other task the first out_dims channels.
    channels = [width - 1] if task.name == "least_squares_icl" else list(range(n_channels))
    assert n_channels == len(channels) <= task.out_dims
    want = pred[:, list(positions)][..., channels]
    got = task.read(jnp.asarray(pred))
    np.testing.assert_array_equal(got, want)
    err = (want - np.asarray(targets)) ** 2
    np.testing.assert_allclose(task.pointwise_error(jnp.asarray(pred), targets), err, **TOL)
    np.testing.assert_allclose(task.loss(jnp.asarray(pred), targets), err.mean(), rtol=1e-14)
    per_position = task.per_position_loss(jnp.asarray(pred), targets)
    np.testing.assert_allclose(per_position, err.mean(axis=(0, 2)), rtol=1e-14)
    metrics = task.eval_metrics(jnp.asarray(pred), targets)
    np.testing.assert_allclose(metrics["mse"], err.mean(), rtol=1e-14)
    if task.name in PRIMITIVE_NAMES:
        y = np.asarray(targets)
        np.testing.assert_allclose(metrics["rel"], np.abs(want - y).mean() / np.abs(y).mean(), rtol=1e-14)
        rel_l2 = np.linalg.norm(want - y) / np.linalg.norm(y)
        np.testing.assert_allclose(metrics["rel_l2"], rel_l2, rtol=1e-14)
    # A prediction narrower than out_dims is an error, not a silent broadcast.
    with pytest.raises(ValueError, match="pred"):
        task.pointwise_error(jnp.asarray(pred[..., : task.out_dims - 1]), targets)
    if task.name in PRIMITIVE_NAMES:  # read at every position: a wrong length is an error too
        with pytest.raises(ValueError, match="pred"):
            task.pointwise_error(jnp.asarray(pred[:, :-1]), targets)


@pytest.mark.parametrize("kwargs", ALL_CONFIGS, ids=_id)
def test_the_model_as_a_solver(kwargs):
    """predicts, is_one_step_solver, steps_per_iter and learned_eta say what the last target is: numpy's
    full gradient at x0, numpy's GD from x0 with the config's num_iters steps of its eta, or x*."""
    cfg = TaskConfig(n_dims=4, n_points=7, **kwargs)
    task = make_task(cfg)
    multistep = cfg.name == "multistep_gd"
    assert task.predicts == {"explicit_gradient": "gradient", "multistep_gd": "iterate",
                             "least_squares": "solution"}.get(cfg.name)
    assert task.is_one_step_solver == (cfg.name in ("explicit_gradient", "multistep_gd"))
    assert task.steps_per_iter == (cfg.num_iters if multistep else 1)
    assert task.learned_eta == (cfg.eta if multistep else None)
    if task.predicts is None:
        return
    batch = task.sample(example_keys(jax.random.key(5), 0, 0, 4))
    a, b, x_star, x0 = (np.asarray(v) for v in batch.raw)

    def gradient(x):
        return np.stack([a_i.T @ (a_i @ x_i - b_i) / cfg.n_points for a_i, b_i, x_i in zip(a, b, x)])

    if cfg.name == "explicit_gradient":
        want = gradient(x0)
    elif multistep:
        want = x0
        for _ in range(kwargs["num_iters"]):
            want = want - kwargs["eta"] * gradient(want)
    else:
        want = x_star
    np.testing.assert_allclose(np.asarray(batch.targets)[:, -1], want, **TOL)


def test_iterated_tasks_are_the_one_step_solvers():
    solvers = [name for name in TASK_NAMES if make_task(TaskConfig(name, n_dims=4)).is_one_step_solver]
    assert solvers == ["explicit_gradient", "multistep_gd"]


def test_sizes():
    sizes = {}
    for kwargs in ALL_CONFIGS:
        task = make_task(TaskConfig(n_dims=6, n_points=10, **kwargs))
        sizes[_id(kwargs)] = (task.in_dims, task.out_dims, task.seq_len(), task.seq_len(4))
    assert sizes == {
        "identity": (6, 6, 10, 4), "square": (6, 6, 10, 4), "elementwise_multiply": (6, 3, 10, 4),
        "read": (6, 6, 10, 4), "linear": (6, 1, 10, 4), "linear-1": (6, 1, 10, 4),
        "least_squares": (7, 6, 10, 4), "least_squares_icl-neighboring": (7, 1, 19, 7),
        "least_squares_icl-concat": (7, 1, 10, 4), "explicit_gradient-last": (7, 6, 11, 5),
        "explicit_gradient-all": (7, 6, 11, 5), "multistep_gd-3-0.3": (7, 6, 11, 5),
    }


def test_plain_functions_for_evaluation():
    """explicit_gradient_inputs / least_squares_gradient / gradient_descent, unbatched and batched."""
    task = make_task(TaskConfig("explicit_gradient", n_dims=4, n_points=7))
    raw = task.sample(example_keys(jax.random.key(4), 0, 0, 4)).raw
    inputs, targets = task.build(raw)
    np.testing.assert_array_equal(lsq.explicit_gradient_inputs(raw.a, raw.b, raw.x0), inputs)
    one = lsq.least_squares_gradient(raw.a[1], raw.b[1], raw.x0[1])  # unbatched
    np.testing.assert_allclose(one, targets[1, 0], **TOL)
    a, b, x0 = (np.asarray(v[0]) for v in (raw.a, raw.b, raw.x0))
    x = x0.copy()
    for _ in range(5):
        x = x - 0.1 * a.T @ (a @ x - b) / 7
    np.testing.assert_allclose(lsq.gradient_descent(a, b, x0, 5, 0.1), x, **TOL)


def test_fixed_random_choices():
    # read: i <= j in [0, L), deterministic in the seed, and the seed matters.
    pairs = {make_task(TaskConfig("read", n_points=9, task_seed=s)).pair for s in range(12)}
    assert all(0 <= i <= j < 9 for i, j in pairs) and len(pairs) > 1
    cfg = TaskConfig("read", n_points=9, task_seed=3)
    assert make_task(cfg) == make_task(cfg)
    # linear: sparsity = the number of nonzeros kept, the kept ones are the dense c's.
    dense = np.array(make_task(TaskConfig("linear", n_dims=8, task_seed=5)).coef)
    assert np.all(dense != 0)
    for s in (1, 3, 8):
        sparse = np.array(make_task(TaskConfig("linear", n_dims=8, task_seed=5, sparsity=s)).coef)
        assert np.count_nonzero(sparse) == s
        np.testing.assert_array_equal(sparse[sparse != 0], dense[sparse != 0])


def test_tasks_are_hashable_static_arguments():
    cfg = TaskConfig("least_squares_icl", n_dims=4, n_points=7)
    assert cfg.setting == "neighboring"  # the default setting is resolved in the config
    t1 = make_task(cfg)
    t2 = make_task(TaskConfig("least_squares_icl", n_dims=4, n_points=7, setting="neighboring"))
    assert t1 == t2 and hash(t1) == hash(t2)
    keys = example_keys(jax.random.key(0), 0, 0, 4)
    # Inside a jitted step, with the task static and the curriculum's dims traced.
    f = jax.jit(lambda task, k, n: task.sample(k, n_dims_truncated=n), static_argnums=0)
    got = f(t1, keys, jnp.asarray(2))
    want = t1.sample(keys, n_dims_truncated=2)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got.raw.a[..., 2:], 0)


def test_curriculum_arguments_of_sample():
    task = make_task(TaskConfig("explicit_gradient", n_dims=4, n_points=9))
    keys = example_keys(jax.random.key(0), 0, 0, 4)
    batch = task.sample(keys, n_points=7, n_dims_truncated=2)
    assert batch.inputs.shape == (4, 8, 5)
    np.testing.assert_array_equal(batch.inputs[:, :, 2:4], 0)  # truncated coordinates of x0 and a_i
    np.testing.assert_array_equal(batch.targets[..., 2:], 0)
    with pytest.raises(ValueError, match="n_dims_truncated"):
        task.sample(keys, n_dims_truncated=5)
    with pytest.raises(ValueError, match="n_points"):
        task.sample(keys, n_points=0)


@pytest.mark.parametrize("kwargs", [
    dict(name="square"),
    dict(name="linear"),
    dict(name="least_squares", scale_cond=2.0),
    dict(name="multistep_gd", scale_cond=2.0),
])
def test_float32(kwargs):
    task = make_task(TaskConfig(n_dims=4, n_points=7, dtype="float32", **kwargs))
    batch = task.sample(example_keys(jax.random.key(0), 0, 0, 4))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(batch))
    pred = jnp.zeros((4, task.seq_len(), task.out_dims), jnp.float32)
    assert task.loss(pred, batch.targets).dtype == jnp.float32


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(name="sqaure"), "name"),
    (dict(name="square", n_dims=0), "n_dims"),
    (dict(name="square", n_points=-3), "n_points"),
    (dict(name="square", n_points=2.5), "n_points"),
    (dict(name="elementwise_multiply", n_dims=5), "n_dims"),
    (dict(name="explicit_gradient", setting="first"), "setting"),
    (dict(name="least_squares_icl", setting="last"), "setting"),
    (dict(name="square", setting="last"), "setting"),
    (dict(name="multistep_gd", num_iters=0), "num_iters"),
    (dict(name="multistep_gd", eta=0.0), "eta"),
    (dict(name="multistep_gd", eta=float("inf")), "eta"),
    (dict(name="linear", sparsity=0), "sparsity"),
    (dict(name="linear", n_dims=4, sparsity=5), "sparsity"),
    (dict(name="square", sparsity=2), "sparsity"),
    (dict(name="read", task_seed=1.5), "task_seed"),
    (dict(name="square", normalize="yes"), "normalize"),
    (dict(name="least_squares", normalize_a=1), "normalize_a"),
    (dict(name="least_squares", normalize_x=None), "normalize_x"),
    (dict(name="square", scale=0), "scale"),
    (dict(name="least_squares", scale_cond=0.5), "scale_cond"),
    (dict(name="least_squares", n_dims=1, scale_cond=2.0), "scale_cond"),
    (dict(name="least_squares", scale_target=-1.0), "scale_target"),
    (dict(name="square", dtype="float16"), "dtype"),
])
def test_task_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: got "):
        TaskConfig(**kwargs)


def test_make_task_rejects():
    with pytest.raises(ValueError, match="read_pair"):
        make_task(TaskConfig("read", n_points=5), read_pair=(3, 2))
    with pytest.raises(ValueError, match="read_pair"):
        make_task(TaskConfig("read", n_points=5), read_pair=(0, 5))
    with pytest.raises(ValueError, match="read_pair"):
        make_task(TaskConfig("square"), read_pair=(0, 1))
    with pytest.raises(ValueError, match="linear_coef"):
        make_task(TaskConfig("linear", n_dims=3), linear_coef=[1.0, 2.0])
    with pytest.raises(ValueError, match="linear_coef"):
        make_task(TaskConfig("identity", n_dims=2), linear_coef=[1.0, 2.0])
    task = make_task(TaskConfig("read", n_dims=2, n_points=5), read_pair=(1, 4))
    with pytest.raises(ValueError, match="n_points"):
        task.build(np.zeros((1, 3, 2)))  # the pair needs L > j
    with pytest.raises(ValueError, match="x with shape"):
        task.build(np.zeros((1, 5, 3)))
    ls = make_task(TaskConfig("least_squares", n_dims=2, n_points=5))
    with pytest.raises(ValueError, match="sample.x_star"):
        ls.build(LeastSquaresSample(np.zeros((1, 5, 2)), np.zeros((1, 5)), np.zeros((1, 2, 1)),
                                    np.zeros((1, 2))))


# -- curriculum ------------------------------------------------------------------------------------------


def _reference_loop(start, end, inc, interval, n_iters):
    """The value used at each iteration: the counter is bumped at the end of every iteration, and inc is
    added whenever the new count is a multiple of interval, capped at end."""
    values, value, count = [], start, 0
    for _ in range(n_iters):
        values.append(value)
        count += 1
        if count % interval == 0:
            value = min(value + inc, end)
    return values


@pytest.mark.parametrize(
    "start,end,inc,interval", [(6, 20, 2, 10), (5, 5, 1, 1), (1, 10, 3, 4), (3, 100, 1, 1), (2, 9, 0, 3)]
)
def test_curriculum_against_hand_loop(start, end, inc, interval):
    cfg = CurriculumConfig(start=start, end=end, inc=inc, interval=interval)
    want = _reference_loop(start, end, inc, interval, 200)
    got = [curriculum_value(cfg, t) for t in range(200)]
    assert got == want and all(isinstance(v, int) for v in got)
    traced = jax.jit(lambda c: curriculum_value(cfg, c))(jnp.arange(200))
    np.testing.assert_array_equal(traced, want)


def test_curriculum_published_icl_run():
    cfg = CurriculumConfig(start=6, end=20, inc=2, interval=10_000)
    counters = (0, 9_999, 10_000, 69_999, 70_000, 10**6)
    assert [curriculum_value(cfg, t) for t in counters] == [6, 6, 8, 18, 20, 20]
    assert CurriculumConfig.constant(20) == CurriculumConfig(20, 20, 0, 1)


@pytest.mark.parametrize("kwargs,field", [
    (dict(start=0, end=5, inc=1, interval=1), "start"),
    (dict(start=5, end=4, inc=1, interval=1), "end"),
    (dict(start=1, end=4, inc=-1, interval=1), "inc"),
    (dict(start=1, end=4, inc=1, interval=0), "interval"),
    (dict(start=1.0, end=4, inc=1, interval=1), "start"),
])
def test_curriculum_rejects(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: got "):
        CurriculumConfig(**kwargs)


def test_curriculum_rejects_negative_counter():
    with pytest.raises(ValueError, match="counter"):
        curriculum_value(CurriculumConfig(1, 2, 1, 1), -1)
