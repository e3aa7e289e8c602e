"""mirage_jax: studying and fixing the safety mirage of vision-language models in JAX/Flax."""

__version__ = "0.1.0"
