"""RMU unlearning of LLaVA-1.5 on VLGuard's forget set, from the base model (Safety Mirage, Sec. 5).

  mirage train --config=configs/vlguard/rmu.py:7b --workdir=runs/rmu \
      --config.init_from=runs/llava7b --config.data.path=DATA/vlguard/...   # built with forget + retain

The paper's final RMU values are not in the official repository; these are its full-parameter script's
(OPTML-Group/VLM-Safety-Unlearn `scripts/finetune_unlearn.sh` with `llava/train/train_unlearn_full.py`):
steer the output of decoder layer 7 towards 10 x a random unit vector, train the MLP down-projections of
layers 5-7 and the projector, retain weight 1.0, LLaVA loss weight 1.0, lr 1e-6, every position in the
loss (the code has no mask). Its 10 epochs are not used: that trainer never resets its retain iterator, so
after the first pass over the 2,000 retain rows (250 steps) every step returns 0 without a backward pass; 250
steps is the training it actually did.
"""

from mirage_configs.unlearn import rmu as generic
from mirage_configs.vlguard import paper

LAYER = 7  # `--rmu_layer_id 7` (0-based: the output of the 8th block)


def get_config(arg: str | None = None):
  size = paper.size_of(arg)
  c = paper.paper_config(arg, unlearning=dict(
      name="rmu",  # trains layers layer-2..layer: `--rmu_layer_ids 5,6,7`
      layer=LAYER if size in ("7b", "13b") else generic.LAYER_BY_SIZE[size],  # smaller models: rmu.py's
      steering=10.0,  # `--rmu_steering_coeffs 10`
      mask="all"))  # the official loss covers every position
  c.loss.alpha = 1.0  # `--rmu_retain_alpha 1.0`
  c.loss.ft_weight = 1.0  # `--rmu_llava_loss_weight 1.0`
  c.optim.frozen = ""
  # `--rmu_param_ids 6` (LLaMA layer parameter 6 = mlp.down_proj.weight) and the projector (unfrozen since
  # the official code's 2026-04-14 revision)
  c.optim.trainable = "projector/.*,decoder/layers/mlp/down/kernel"
  c.batch_size = 8  # `--per_device_train_batch_size 1` on 8 GPUs
  c.optim.lr = 1e-6  # `--learning_rate 10e-7`
  c.total_steps = paper.RETAIN_ROWS // c.batch_size  # 250: the steps that trained (see the docstring)
  c.optim.warmup_steps = paper.warmup(c.total_steps)
  c.checkpoint_every = 125
  c.lock()
  return c
