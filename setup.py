"""mirage_jax: the safety mirage of vision-language models, in JAX/Flax.

Installs three import packages from this repository:
  mirage_jax      the library and the `mirage` command line
  mirage_kernels  fused kernels (source folder `kernels/`; the PyPI name `kernels` belongs to someone else)
  mirage_configs  the experiment configs (source folder `configs/`), so installed code can find them
"""

from setuptools import setup

setup(
    name="mirage_jax",
    version="0.1.0",
    description="Studying and fixing the safety mirage of VLMs: safety SFT vs unlearning, in JAX/Flax",
    python_requires=">=3.11",
    packages=[
        "mirage_jax", "mirage_jax.models", "mirage_jax.data", "mirage_jax.losses", "mirage_jax.train",
        "mirage_jax.eval", "mirage_jax.audit", "mirage_jax.report",
        "mirage_kernels", "mirage_kernels.token_logprob",
        "mirage_configs", "mirage_configs.pretrain", "mirage_configs.sft", "mirage_configs.unlearn",
        "mirage_configs.ablations",
    ],
    package_dir={
        "mirage_kernels": "kernels",
        "mirage_kernels.token_logprob": "kernels/token_logprob",
        "mirage_configs": "configs",
        "mirage_configs.pretrain": "configs/pretrain",
        "mirage_configs.sft": "configs/sft",
        "mirage_configs.unlearn": "configs/unlearn",
        "mirage_configs.ablations": "configs/ablations",
    },
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",
        "tokenizers>=0.23",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",
        "importlib_resources>=6.0",  # tensorflow-datasets needs it without TensorFlow
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "numpy>=2.0",
        "pillow>=10.0",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda13]>=0.10.2"],
    },
    entry_points={"console_scripts": ["mirage=mirage_jax.cli:main"]},
)
