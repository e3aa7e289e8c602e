"""mirage_jax: the safety mirage of vision-language models, in JAX/Flax.

Installs three import packages from this repository:
  mirage_jax      the library and the `mirage` command line
  mirage_kernels  fused kernels (source folder `mirage_kernels/`: a folder named `kernels/` shadowed the PyPI
                  package `kernels`, which transformers >= 5.25 imports, whenever Python ran from the checkout)
  mirage_configs  the experiment configs (source folder `configs/`), so installed code can find them
"""

from setuptools import find_packages, setup


def _renamed(name: str, folder: str) -> dict[str, str]:
  """{import name: source folder} for `folder` and its subpackages, installed under the import name `name`."""
  subs = find_packages(where=folder)
  return {name: folder, **{f"{name}.{p}": f"{folder}/{p.replace('.', '/')}" for p in subs}}


RENAMED = _renamed("mirage_configs", "configs")

setup(
    name="mirage_jax",
    version="0.1.0",
    description="Studying and fixing the safety mirage of VLMs: safety SFT vs unlearning, in JAX/Flax",
    python_requires=">=3.11",
    packages=[*find_packages(include=["mirage_jax", "mirage_jax.*", "mirage_kernels", "mirage_kernels.*"]), *RENAMED],
    package_dir=RENAMED,
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
        "scipy>=1.11",  # stats.false_discovery_control (the audit's q-values), binomtest(...).proportion_ci
        "ml_dtypes>=0.2",  # bfloat16 as a numpy dtype (models/safetensors_io.py)
        "pillow>=10.0",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "safetensors>=0.4.1",  # its numpy API reads/writes BF16 (as ml_dtypes.bfloat16) from 0.4.1 on
    ],
    extras_require={
        # jax[tpu] installs libtpu (TPU AOT-compile tests); torch (the CPU wheel) runs HF PyTorch parity tests;
        # peft loads exported LoRA adapters onto the exported HF base (tests/test_lora_export.py)
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "jax[tpu]>=0.10.2", "torch==2.13.0", "peft==0.21.2"],
        "hf": ["torch==2.13.0"],  # `mirage convert check-parity` and benchmarks/vs_hf.py
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda13]>=0.10.2"],
    },
    entry_points={"console_scripts": ["mirage=mirage_jax.cli:main"]},
)
