"""Optimizers: the high-precision training recipe as Optax transforms, gradient statistics, and the
Levenberg-Marquardt math. Import the modules themselves; this package re-exports nothing.

One step of the recipe, as ``recipe.make_optimizer(cfg)`` builds it (the rest runs inside the guard)::

    gradient --> step_guard: clip by global norm (100), skip non-finite steps
             --> ema_filter (when ema_lambda > 0)
             --> base direction: Adam eps 1e-16 | AdamW | SGD momentum 0.9    (Optax)
             --> lr_controller: scale by -lr (constant | step | adaptive schedule)

* ``recipe``: ``make_optimizer`` and ``optimizer_metrics`` (the scalars the train loop logs).
* ``step_guard``: clip, skip non-finite (or too large) steps, count them (``skipped_steps``).
* ``ema_filter``: the reference's Grokfast-style ``gradfilter_ema``.
* ``lr_controller``: the learning-rate schedules; owns the lr, the count of applied steps and the EMA of
  the gradient-cosine metric (``current_lr``, ``applied_steps``).
* ``grad_stats``: the reference's statistics of a matrix of mini-batch gradients; the adaptive schedule
  consumes their ``gradient_cosine_mean``.
* ``lm``: Levenberg-Marquardt on a model's flattened parameters (the math of the LM trainer);
  ``lm_damping``: its scaling and damping rules.
* ``lm_transform``: LM as an Optax-style transform taking the residual function as an extra argument, and
  the Adam-then-LM hybrid (``make_lm_optimizer``).

Imports point one way: recipe -> step_guard, ema_filter, lr_controller; lm_transform -> recipe, lm ->
lm_damping; their settings are ``lsq_jax.config.optim.OptimConfig``.
"""
