"""lsq_jax: sequence models trained to perform gradient descent on least squares to machine precision."""
