"""Command bodies: orchestration above the library (the top layer, beside `mirage_jax.cli`).

  convert  Hugging Face LLaVA directories <-> mirage run directories (`mirage convert`)
  data     build a dataset, print a split's first-word statistics (`mirage data`)
  demo     the whole experiment in-process: stages, evaluation, report, world ablation (`mirage demo`)
  sweep    the points of an ablation config as commands, run or printed (`mirage sweep`)

Modules here may import any library package; no library package imports them (tests/test_layering.py).
"""
