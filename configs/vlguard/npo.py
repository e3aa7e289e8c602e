"""NPO unlearning of LLaVA-1.5 on VLGuard's forget set, from the base model (Safety Mirage, Sec. 5).

  mirage train --config=configs/vlguard/npo.py:7b --workdir=runs/npo \
      --config.init_from=runs/llava7b --config.data.path=DATA/vlguard/...   # built with forget + retain

Values of the paper's final NPO run, OPTML-Group/VLM-Safety-Unlearn `scripts/finetune_unlearn_npo.sh` (7B;
the same script serves 13B): lr 5e-7, one epoch over the 2,000 retain rows at 1 per device on 8 GPUs, beta
0.9, forget / retain / LLaVA-loss weights 1.0. Two deliberate differences from that code: the NPO term uses
the summed sequence log-prob of the paper's NPO (the code pools token NLLs over the batch; set
`--config.loss.normalize=mean_token` for that) and the retain term is the NLL (the code's "retain NPO" term
is non-standard).
"""

from mirage_configs.vlguard import paper


def get_config(arg: str | None = None):
  c = paper.paper_config(arg, unlearning=dict(
      name="npo", beta=0.9,  # `--npo_beta 0.9`
      normalize="sum", forget_input="answer", retain="nll", reference_cache=False))
  c.loss.alpha = 1.0  # `--npo_retain_alpha 1.0`
  c.loss.ft_weight = 1.0  # `--npo_llava_loss_weight 1.0`
  c.batch_size = 8  # `--per_device_train_batch_size 1` on 8 GPUs
  c.optim.lr = 5e-7  # `--learning_rate 5e-7`
  c.optim.frozen = "vision/.*"  # `--freeze_mm_mlp_adapter False`, vision tower frozen (LLaVA default)
  c.total_steps = paper.RETAIN_ROWS // c.batch_size  # `--num_train_epochs 1` over the retain set: 250
  c.optim.warmup_steps = paper.warmup(c.total_steps)
  c.checkpoint_every = 125
  c.lock()
  return c
