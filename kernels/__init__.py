"""mirage_kernels: fused kernels for mirage_jax (installed from the `kernels/` folder)."""
