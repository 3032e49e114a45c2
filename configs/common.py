"""What every config shares: the defaults of the reference's training runs (SPEC §5-6), in float64.

Sections mirror the frozen dataclasses the config is converted into (lsq_jax.experiment): `task`
(TaskConfig), `model` (ModelConfig without the sizes that come from the task), `optim` (OptimConfig),
`train`, `curriculum`. Every field is overridable from the command line, e.g. `--config.optim.lr=3e-3`.
"""
import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"  # short name used in the default workdir runs/<name>-<timestamp>
    c.seed = 0  # one run key: parameters from fold_in(key, 0), data from fold_in(key, 1)
    c.dtype = "float64"  # float64 | float32: data, parameters and activations alike
    c.matmul_precision = "highest"  # highest | high | default: GPUs default to TF32 and TPUs to bfloat16 passes for float32

    c.task = ml_collections.ConfigDict()
    c.task.name = "explicit_gradient"  # identity|square|elementwise_multiply|read|linear|least_squares|least_squares_icl|explicit_gradient|multistep_gd
    c.task.n_dims = 5  # D, problem dimension
    c.task.n_points = 20  # L, rows (a_i, b_i) or sequence points
    c.task.setting = config_dict.placeholder(str)  # explicit_gradient: last|all; least_squares_icl: neighboring|concat
    c.task.num_iters = 4  # multistep_gd: k
    c.task.eta = 0.5  # multistep_gd: GD step size
    c.task.sparsity = config_dict.placeholder(int)  # linear: number of nonzero coefficients kept
    c.task.task_seed = 0  # read pair and linear coefficients
    c.task.normalize = False  # gaussian: unit rows
    c.task.scale = 1.0  # gaussian: multiplier
    c.task.normalize_a = False  # least squares: unit rows of A
    c.task.scale_cond = 1.0  # least squares: condition number kappa of A (1 = unchanged)
    c.task.normalize_x = False  # least squares: unit x* and x0
    c.task.scale_target = 1.0  # least squares: multiplier of x* and x0

    c.model = ml_collections.ConfigDict()
    c.model.mixer = "baseconv"  # baseconv | attention | linear_attention
    c.model.conv_type = "short"  # baseconv: short | long | implicit
    c.model.n_embd = 64  # width E
    c.model.n_layer = 3  # blocks
    c.model.n_head = 1  # attention heads
    c.model.n_positions = config_dict.placeholder(int)  # L_max (default: the task's sequence length)
    c.model.out_dims = config_dict.placeholder(int)  # read-out width (default: what the task reads)
    c.model.causal = True
    c.model.use_resid = True
    c.model.use_mlps = False
    c.model.mlp_activ = "relu"  # relu | gelu | glu
    c.model.mlp_upfactor = 4
    c.model.use_seqop_ln = False
    c.model.use_mlp_ln = False
    c.model.use_final_ln = False
    c.model.use_bias = True
    c.model.train_proj = True  # False: read-in/out frozen to rectangular identities
    c.model.train_pos = True  # False: no positional embedding

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adam"  # adam | adamw | sgd | lm (Levenberg-Marquardt on train.batch_size problems)
    c.optim.lr = 1e-3  # initial learning rate
    c.optim.schedule = "step"  # step (step-threshold) | adaptive
    c.optim.step_rate = 10_000  # applied steps between learning-rate changes
    c.optim.gamma = 0.9  # learning-rate factor per change
    c.optim.lr_floor = 1e-10  # decay floor
    c.optim.initial_decay = True  # adaptive: the reference decays once when built (starts at lr * gamma)
    c.optim.metric_decay = 0.9  # adaptive: EMA factor of the gradient-cosine metric
    c.optim.metric_threshold = 0.9  # adaptive: grow the lr when the metric EMA falls below this
    c.optim.no_increase_length = 1000  # adaptive: no growth before this many applied steps
    c.optim.clip_norm = 100.0  # clip by global norm
    c.optim.skip_norm = config_dict.placeholder(float)  # also skip steps whose pre-clip norm exceeds this
    c.optim.ema_alpha = 0.98  # EMA-over-gradients decay
    c.optim.ema_lambda = 0.0  # EMA-over-gradients gain (0 = off)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-16  # Adam epsilon: 1e-16, not 1e-8, is part of the high-precision recipe
    c.optim.weight_decay = 0.0  # adamw only
    c.optim.momentum = 0.9  # sgd only
    c.optim.l1 = 0.0  # L1 penalty lambda * sum |p| added to the loss
    c.optim.lm_after = 0  # lm: iterations of the Adam recipe above before LM takes over (0: LM throughout)
    c.optim.lm_refresh_every = 0  # lm: a new batch of problems every this many LM iterations (0: fixed)
    c.optim.lm_damping = 1e-3  # lm: initial damping, relative to Marquardt's diagonal scaling
    c.optim.lm_solver = "cholesky"  # lm: cholesky (dense P x P normal equations) | cg (matrix-free)
    c.optim.lm_cg_iters = 100  # lm: conjugate-gradient iterations per step with lm_solver=cg
    c.optim.lm_geodesic = False  # lm: geodesic acceleration
    c.optim.lm_tries = 10  # lm: damped solves per iteration (a rejected step is re-solved, reusing J^T J)
    c.optim.lm_chunk = 0  # lm: problems per Jacobian chunk (0: auto)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 1024  # global batch, split over every device of every process
    c.train.num_steps = 1_000_000  # training iterations
    c.train.log_every = 1000  # progress line, metrics and gradient statistics every this many steps
    c.train.grad_stats_batches = 64  # mini-batches for the gradient statistics (0 = none; adaptive needs >= 2)
    c.train.microbatch_size = 0  # examples per device per gradient-accumulation chunk (0 = auto: 2^17-element activations on CPU)
    c.train.eval_batch_size = 4096  # fresh problems for the evaluation at the end
    c.train.eval_problems = 256  # problems in the iterated-use / out-of-distribution report
    c.train.eval_iters = 1000  # iterations of iterated use in that report
    c.train.checkpoint_every = 10_000  # steps between checkpoints

    c.curriculum = ml_collections.ConfigDict()
    for var in ("points", "dims"):  # points -> task.n_points, dims -> task.n_dims (the final values)
        c.curriculum[var] = ml_collections.ConfigDict()
        c.curriculum[var].start = config_dict.placeholder(int)  # None: no curriculum for this variable
        c.curriculum[var].inc = 0
        c.curriculum[var].interval = 1
    return c


def apply_variant(c: ml_collections.ConfigDict, variant: str | None, *, cpu: dict, smoke: dict, **more: dict):
    """Size the config for a variant: '' (published), 'cpu' (<= 10 min on 2 cores), 'smoke' (<= 60 s), or
    one of `more` (e.g. 'lm')."""
    sizes = {None: {}, "": {}, "cpu": cpu, "smoke": smoke, **more}
    if variant not in sizes:
        names = ", ".join(["cpu", "smoke", *more])
        raise ValueError(f"config variant {variant!r} is not allowed: must be one of {names} (or none)")
    c.update_from_flattened_dict(sizes[variant])
    if variant:
        c.name = f"{c.name}-{variant}"
    return c


def split_arg(arg: str | None) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c']; None -> []."""
    return [part for part in (arg or "").split(",") if part]
