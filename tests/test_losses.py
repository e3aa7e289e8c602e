"""Unlearning losses: closed-form checks of the pieces (NPO, log-probs, RMU) and of the loss objects on a tiny
random VLM (NPO, RMU, GradDiff, SimNPO, the composite weights).

Everything runs on tiny arrays or a shrunk `tiny` VLM (depth-4 decoder of width 32, 4 image tokens), with
one jitted call per check, so the module stays fast on CPU.
"""

from __future__ import annotations

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_configs import models as model_configs
from mirage_jax.errors import ConfigError
from mirage_jax.losses import LOSSES, composite, logprob, make_loss, npo, rmu
from mirage_jax.losses.rmu import RMU
from mirage_jax.models import VLM, VLMConfig

IMAGE_ID, BOS, EOS, PAD = 4, 1, 2, 0
VOCAB, WIDTH, DEPTH, T = 64, 32, 4, 20


def _softplus(x):
  return np.logaddexp(0.0, x)


# --------------------------------------------------------------------------- NPO forget term (closed form)
LOGP = np.array([-3.0, -5.0, -1.0, -7.5], np.float32)
REF = np.array([-2.5, -6.0, -1.0, -4.0], np.float32)
NTOK = np.array([3.0, 4.0, 2.0, 6.0], np.float32)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9, 2.0])
def test_npo_forget_sum_matches_formula(beta):
  loss, d = npo.npo_forget(jnp.asarray(LOGP), jnp.asarray(REF), jnp.asarray(NTOK), beta=beta, normalize="sum")
  # -(2/beta) log sigmoid(-beta d) = (2/beta) softplus(beta d), averaged over sequences.
  expected = np.mean(-(2.0 / beta) * np.log(1.0 / (1.0 + np.exp(beta * (LOGP - REF)))))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean((2.0 / beta) * _softplus(beta * (LOGP - REF))), rtol=1e-5)
  np.testing.assert_allclose(float(d), np.mean(LOGP - REF), rtol=1e-6)


@pytest.mark.parametrize("normalize", ["sum", "mean_token"])
@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_npo_forget_at_reference_is_two_over_beta_log2(beta, normalize):
  loss, d = npo.npo_forget(jnp.asarray(LOGP), jnp.asarray(LOGP), jnp.asarray(NTOK), beta=beta, normalize=normalize)
  np.testing.assert_allclose(float(loss), (2.0 / beta) * math.log(2.0), rtol=1e-6)
  assert float(d) == 0.0


@pytest.mark.parametrize("normalize", ["sum", "mean_token"])
def test_npo_forget_gradient_descent_lowers_the_forget_likelihood(normalize):
  beta = 0.7
  grad = jax.grad(lambda lp: npo.npo_forget(lp, jnp.asarray(REF), jnp.asarray(NTOK), beta=beta,
                                             normalize=normalize)[0])(jnp.asarray(LOGP))
  grad = np.asarray(grad)
  # d loss / d logp > 0: a gradient-descent step (logp -= lr * grad) decreases every forget log-prob.
  assert np.all(grad > 0), grad
  if normalize == "sum":
    # d/d logp_i of mean_i (2/beta) softplus(beta d_i) = (2/B) sigmoid(beta d_i): NPO's adaptive weight.
    expected = 2.0 / len(LOGP) / (1.0 + np.exp(-beta * (LOGP - REF)))
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
  lp = jnp.asarray(LOGP)
  before = float(npo.npo_forget(lp, jnp.asarray(REF), jnp.asarray(NTOK), beta=beta, normalize=normalize)[0])
  after = float(npo.npo_forget(lp - 0.1 * grad, jnp.asarray(REF), jnp.asarray(NTOK), beta=beta,
                               normalize=normalize)[0])
  assert after < before


def test_npo_forget_mean_token_matches_official_code():
  """Official: -(2/beta) logsigmoid(beta * (CE_theta - CE_ref)), CE = batch-pooled token-mean NLL."""
  beta = 0.9
  loss, d = npo.npo_forget(jnp.asarray(LOGP), jnp.asarray(REF), jnp.asarray(NTOK), beta=beta,
                           normalize="mean_token")
  ce_theta = -LOGP.sum() / NTOK.sum()
  ce_ref = -REF.sum() / NTOK.sum()
  official = -(2.0 / beta) * np.log(1.0 / (1.0 + np.exp(-beta * (ce_theta - ce_ref))))
  np.testing.assert_allclose(float(loss), official, rtol=1e-5)
  np.testing.assert_allclose(float(d), -(ce_theta - ce_ref), rtol=1e-5)
  # ...which is not the per-sequence (paper) value.
  summed, _ = npo.npo_forget(jnp.asarray(LOGP), jnp.asarray(REF), jnp.asarray(NTOK), beta=beta, normalize="sum")
  assert abs(float(summed) - float(loss)) > 1e-3


# --------------------------------------------------------------------------- log-probs
def test_next_token_labels():
  tokens = np.array([[10, 11, 12, 13, 14, 0], [20, 21, 22, 23, 24, 25]], np.int32)
  loss_mask = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], np.int32)
  labels = np.asarray(logprob.next_token_labels(jnp.asarray(tokens), jnp.asarray(loss_mask)))
  np.testing.assert_array_equal(labels, [[-1, 12, 13, -1, -1, -1], [-1, -1, -1, 24, 25, -1]])
  assert labels.dtype == np.int32


def _manual_log_softmax(hidden, w):
  logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), w.astype(np.float64))
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_token_logprob_matches_manual_gather():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 5, 8)).astype(np.float32)
  w = rng.normal(size=(8, 11)).astype(np.float32)
  labels = np.array([[3, -1, 0, 10, -1], [-1, -1, 7, 7, 2]], np.int32)
  got = np.asarray(logprob.token_logprob(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(labels)))
  logp = _manual_log_softmax(hidden, w)
  expected = np.where(labels >= 0, np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0], 0.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert np.all(got[labels < 0] == 0.0)
  assert np.all(got[labels >= 0] < 0.0)
  with pytest.raises(ValueError, match="logprob_impl"):
    logprob.token_logprob(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(labels), impl="nope")


def test_sequence_logprob_sums_scored_tokens():
  logp = np.array([[-1.0, -2.0, 0.0, -0.5], [0.0, 0.0, -3.0, 0.0]], np.float32)
  labels = np.array([[5, 6, -1, 7], [-1, -1, 9, -1]], np.int32)
  total, n = logprob.sequence_logprob(jnp.asarray(logp), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(total), [-3.5, -3.0])
  np.testing.assert_array_equal(np.asarray(n), [3.0, 1.0])


def test_token_kl():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 4, 6)).astype(np.float32)
  w = rng.normal(size=(6, 9)).astype(np.float32)
  h_ref = (h + 0.5 * rng.normal(size=h.shape)).astype(np.float32)
  w_ref = (w + 0.3 * rng.normal(size=w.shape)).astype(np.float32)
  labels = np.array([[1, -1, 2, 3], [-1, -1, -1, 4]], np.int32)
  same = float(logprob.token_kl(jnp.asarray(h), jnp.asarray(w), jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels)))
  assert abs(same) < 1e-6
  kl = float(logprob.token_kl(jnp.asarray(h), jnp.asarray(w), jnp.asarray(h_ref), jnp.asarray(w_ref),
                              jnp.asarray(labels)))
  logp, ref = _manual_log_softmax(h, w), _manual_log_softmax(h_ref, w_ref)
  kl_bt = (np.exp(ref) * (ref - logp)).sum(-1)  # KL(pi_ref || pi_theta)
  expected = kl_bt[labels >= 0].mean()
  assert kl > 0
  np.testing.assert_allclose(kl, expected, rtol=1e-4)
  # The direction matters: KL(theta || ref) is a different number.
  reverse = (np.exp(logp) * (logp - ref)).sum(-1)[labels >= 0].mean()
  assert abs(reverse - expected) > 1e-3
  none = float(logprob.token_kl(jnp.asarray(h), jnp.asarray(w), jnp.asarray(h_ref), jnp.asarray(w_ref),
                                jnp.full_like(jnp.asarray(labels), -1)))
  assert none == 0.0


# --------------------------------------------------------------------------- a tiny VLM
def tiny_vlm_config(depth: int = DEPTH) -> VLMConfig:
  mc = model_configs.model_config("tiny")
  mc.vision.update(dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
  mc.text.update(dict(vocab_size=VOCAB, width=WIDTH, depth=depth, num_heads=2, num_kv_heads=1, head_dim=16,
                      mlp_dim=64, max_len=32))
  return VLMConfig.from_config(mc, image_token_id=IMAGE_ID)


@pytest.fixture(scope="module")
def vlm():
  """Structure from the real model, values drawn with numpy (initialising the real model on a loaded
  2-core machine costs seconds of op compilation); `other` is a nearby, different reference."""
  cfg = tiny_vlm_config()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype), nnx.to_pure_dict(abstract))
  other = jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype), params)
  return types.SimpleNamespace(cfg=cfg, graphdef=graphdef, params=params, other=other, jitted={})


def make_batch(seed: int, rows=(0, 1, 2, 3), *, batch: int = 4) -> dict[str, np.ndarray]:
  """[BOS] <image>x4 question answer [EOS] pad..., right-padded to T; loss on answer + EOS."""
  rng = np.random.default_rng(seed)
  tokens = np.full((batch, T), PAD, np.int32)
  mask, loss_mask, query_mask = (np.zeros((batch, T), np.int32) for _ in range(3))
  for b in range(batch):
    q, a = int(rng.integers(3, 6)), int(rng.integers(2, 6))
    ids = [BOS] + [IMAGE_ID] * 4 + list(rng.integers(5, VOCAB, q)) + list(rng.integers(5, VOCAB, a)) + [EOS]
    tokens[b, :len(ids)] = ids
    mask[b, :len(ids)] = 1
    query_mask[b, 5:5 + q] = 1
    loss_mask[b, 5 + q:len(ids)] = 1
  images = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "query_mask": query_mask, "images": images,
          "row": np.asarray(rows, np.int32)}


FORGET, RETAIN = make_batch(1, rows=(5, 0, 3, 2)), make_batch(2)


def call(vlm, config, params, ref_params=None, extras=None, forget=FORGET, retain=RETAIN):
  """The loss `config` names, under jit (one compile per config) -> (float loss, {name: float})."""
  key = ("loss", json.dumps(config, sort_keys=True))
  if key not in vlm.jitted:
    loss = make_loss(config)

    def f(params, ref_params, batches, extras):
      ref = None if ref_params is None else nnx.merge(vlm.graphdef, ref_params)
      return loss(nnx.merge(vlm.graphdef, params), batches=batches, reference=ref, extras=extras)

    vlm.jitted[key] = jax.jit(f)
  value, metrics = vlm.jitted[key](params, ref_params, {"forget": forget, "retain": retain}, extras)
  return float(value), {k: float(v) for k, v in metrics.items()}


def scored(vlm, params, batch, target="answer", collect=()):
  """Per-sequence log-probs, token counts, token-mean NLL and collected layers of `batch` under `params`."""
  key = ("score", target, collect)
  if key not in vlm.jitted:

    def f(params, batch):
      model = nnx.merge(vlm.graphdef, params)
      s = composite.score(model, batch, target=target, collect=collect)
      logp, n = s.sequence_logprob()
      return logp, n, s.token_mean_nll(), s.layers, s.hidden_btd, model.head_weight()

    vlm.jitted[key] = jax.jit(f)
  logp, n, nll, layers, hidden, head = vlm.jitted[key](params, batch)
  vlm.last_hidden = (np.asarray(hidden), np.asarray(head))  # final hidden states and LM head of this call
  return np.asarray(logp, np.float64), np.asarray(n), float(nll), {k: np.asarray(v) for k, v in layers.items()}


NPO_ALPHA, NPO_FT, NPO_BETA = 0.5, 2.0, 0.5


def npo_config(**kw) -> dict:
  config = dict(name="npo", beta=NPO_BETA, normalize="sum", forget_input="answer", retain="nll",
                reference_cache=False, alpha=NPO_ALPHA, ft_weight=NPO_FT, logprob_impl="reference")
  return {**config, **kw}


# --------------------------------------------------------------------------- NPO object
def test_npo_at_reference(vlm):
  assert make_loss(npo_config()).needs_reference
  value, m = call(vlm, npo_config(), vlm.params, vlm.params)
  np.testing.assert_allclose(m["forget"], (2.0 / NPO_BETA) * math.log(2.0), rtol=1e-5)
  assert abs(m["logratio"]) < 1e-5
  _, _, retain_nll, _ = scored(vlm, vlm.params, RETAIN)
  np.testing.assert_allclose(m["retain"], retain_nll, rtol=1e-5)
  np.testing.assert_allclose(m["ft"], retain_nll, rtol=1e-5)
  np.testing.assert_allclose(value, m["forget"] + NPO_ALPHA * m["retain"] + NPO_FT * m["ft"], rtol=1e-5)


def test_npo_forget_uses_policy_minus_reference(vlm):
  """With policy != reference the forget term is the NPO formula of (policy, reference) in that order."""
  _, m = call(vlm, npo_config(), vlm.params, vlm.other)
  pol, n, _, _ = scored(vlm, vlm.params, FORGET)
  ref, _, _, _ = scored(vlm, vlm.other, FORGET)
  d = pol - ref
  assert np.all(np.abs(d) > 1e-3)
  np.testing.assert_allclose(m["forget"], np.mean((2.0 / NPO_BETA) * _softplus(NPO_BETA * d)), rtol=1e-4)
  np.testing.assert_allclose(m["logratio"], np.mean(d), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["forget_nll"], -pol.sum() / n.sum(), rtol=1e-5)


def test_npo_forget_input_query_scores_the_query(vlm):
  _, answer = call(vlm, npo_config(), vlm.params, vlm.params)
  _, query = call(vlm, npo_config(forget_input="query"), vlm.params, vlm.params)
  _, q_n, q_nll, _ = scored(vlm, vlm.params, FORGET, target="query")
  _, a_n, a_nll, _ = scored(vlm, vlm.params, FORGET, target="answer")
  np.testing.assert_array_equal(q_n, FORGET["query_mask"].sum(1))
  np.testing.assert_array_equal(a_n, FORGET["loss_mask"].sum(1))
  np.testing.assert_allclose(query["forget_nll"], q_nll, rtol=1e-5)
  np.testing.assert_allclose(answer["forget_nll"], a_nll, rtol=1e-5)
  assert abs(query["forget_nll"] - answer["forget_nll"]) > 1e-3
  np.testing.assert_allclose(query["forget"], answer["forget"], rtol=1e-6)  # both at the reference
  with pytest.raises(ValueError, match="forget_input"):
    make_loss(npo_config(forget_input="image"))


def test_npo_retain_kl(vlm):
  assert make_loss(npo_config(retain="kl")).needs_reference
  _, same = call(vlm, npo_config(retain="kl"), vlm.params, vlm.params)
  assert abs(same["retain"]) < 1e-6
  _, diff = call(vlm, npo_config(retain="kl"), vlm.params, vlm.other)
  assert diff["retain"] > 1e-5
  _, _, retain_nll, _ = scored(vlm, vlm.params, RETAIN)
  np.testing.assert_allclose(diff["ft"], retain_nll, rtol=1e-5)  # l_ft stays the CE
  # retain = mean over scored retain positions of KL(pi_ref || pi_theta), by hand from both models' states.
  h, w = vlm.last_hidden
  scored(vlm, vlm.other, RETAIN)
  h_ref, w_ref = vlm.last_hidden
  logp, ref = _manual_log_softmax(h, w), _manual_log_softmax(h_ref, w_ref)
  valid = np.asarray(logprob.next_token_labels(RETAIN["tokens"], RETAIN["loss_mask"])) >= 0
  kl = (np.exp(ref) * (ref - logp)).sum(-1)[valid].mean()
  np.testing.assert_allclose(diff["retain"], kl, rtol=1e-3)
  reverse = (np.exp(logp) * (logp - ref)).sum(-1)[valid].mean()
  assert abs(reverse - kl) > 1e-3 * kl


def test_npo_reference_cache_matches_on_the_fly_reference(vlm):
  cached = make_loss(npo_config(reference_cache=True))
  assert not cached.needs_reference  # with retain=nll the cache replaces the reference forward
  assert make_loss(npo_config(reference_cache=True, retain="kl")).needs_reference

  pre = jax.jit(lambda ref, batch: cached.precompute(nnx.merge(vlm.graphdef, ref), batch))(vlm.other, FORGET)
  ref_logp, _, _, _ = scored(vlm, vlm.other, FORGET)
  np.testing.assert_allclose(np.asarray(pre["ref_logp"]), ref_logp, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(pre["n_tokens"]), FORGET["loss_mask"].sum(1))
  # A cache over a 6-row split: the batch holds rows (5, 0, 3, 2); rows 1 and 4 are someone else's.
  table = np.full((6,), 1e3, np.float32)
  table[FORGET["row"]] = np.asarray(pre["ref_logp"])
  extras = {"cache/forget/ref_logp": jnp.asarray(table), "cache/forget/n_tokens": jnp.zeros((6,), jnp.float32)}

  value, m = call(vlm, npo_config(reference_cache=True), vlm.params, None, extras)
  want_value, want = call(vlm, npo_config(), vlm.params, vlm.other)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for key in ("forget", "logratio", "retain", "ft"):
    np.testing.assert_allclose(m[key], want[key], rtol=1e-5, atol=1e-6)
  assert abs(m["forget"] - (2.0 / NPO_BETA) * math.log(2.0)) > 1e-3  # policy != reference: a real check
  # Rows are looked up by `row`, not by position in the batch.
  by_position = np.full((6,), 1e3, np.float32)
  by_position[:4] = np.asarray(pre["ref_logp"])
  _, wrong = call(vlm, npo_config(reference_cache=True), vlm.params, None,
                  {**extras, "cache/forget/ref_logp": jnp.asarray(by_position)})
  assert abs(wrong["forget"] - want["forget"]) > 1e-3


def test_npo_config_errors():
  with pytest.raises(ValueError, match="beta"):
    make_loss(npo_config(beta=0.0))
  with pytest.raises(ValueError, match="normalize"):
    make_loss(npo_config(normalize="token"))
  with pytest.raises(ValueError, match="retain"):
    make_loss(npo_config(retain="mse"))
  with pytest.raises(ValueError, match="unknown loss.name"):
    make_loss(dict(name="dpo"))


# --------------------------------------------------------------------------- RMU pieces
def _rmu_batch():
  #          BOS img img q   q   a   a   EOS pad pad
  tokens = [[1, 4, 4, 7, 8, 9, 10, 2, 0, 0],
            [1, 4, 4, 11, 12, 2, 0, 0, 0, 0]]
  mask = [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
          [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
  loss_mask = [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
               [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]]
  query_mask = [[0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
                [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
  return {k: jnp.asarray(np.array(v, np.int32)) for k, v in
          dict(tokens=tokens, mask=mask, loss_mask=loss_mask, query_mask=query_mask).items()}


@pytest.mark.parametrize("kind,expected", [
    # positions whose NEXT token is an answer token (the states that generate the answer)
    ("answer", [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]]),
    ("image_answer", [[0, 1, 1, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0, 0, 0, 0]]),
    ("query", [[0, 0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]),
    ("text", [[1, 0, 0, 1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 1, 1, 1, 0, 0, 0, 0]]),
    ("all", [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]),
])
def test_rmu_position_mask(kind, expected):
  got = np.asarray(rmu.position_mask(_rmu_batch(), kind, IMAGE_ID))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, np.array(expected, np.float32))


def test_rmu_position_mask_rejects_unknown_kind():
  with pytest.raises(ValueError, match="loss.mask"):
    rmu.position_mask(_rmu_batch(), "padding", IMAGE_ID)
  with pytest.raises(ValueError, match="loss.mask"):
    RMU(layer=1, mask="padding")


def test_rmu_masked_mse():
  h = np.array([[[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]]], np.float32)  # [1, 3, 2]
  target = np.array([1.0, 1.0], np.float32)
  mask = np.array([[1.0, 0.0, 1.0]], np.float32)
  # position 0: ((0)^2 + (1)^2) / 2 = 0.5; position 2: (1 + 1) / 2 = 1; mean over the 2 masked = 0.75
  got = float(rmu.masked_mse(jnp.asarray(h), jnp.asarray(target), jnp.asarray(mask)))
  np.testing.assert_allclose(got, 0.75, rtol=1e-6)
  # A full target tensor works the same way; an empty mask gives 0, not NaN.
  full = np.broadcast_to(target, h.shape)
  np.testing.assert_allclose(float(rmu.masked_mse(jnp.asarray(h), jnp.asarray(full), jnp.asarray(mask))), 0.75)
  assert float(rmu.masked_mse(jnp.asarray(h), jnp.asarray(target), jnp.zeros((1, 3)))) == 0.0


def test_rmu_control_vector():
  key = jax.random.key(3)
  u = np.asarray(rmu.control_vector(key, 32, 6.5))
  assert u.shape == (32,)
  np.testing.assert_allclose(np.linalg.norm(u), 6.5, rtol=1e-5)
  assert np.all(u >= 0)  # positive orthant, as uniform [0, 1) before normalising
  np.testing.assert_array_equal(u, np.asarray(rmu.control_vector(jax.random.key(3), 32, 6.5)))
  assert not np.allclose(u, np.asarray(rmu.control_vector(jax.random.key(4), 32, 6.5)))


def test_rmu_init_extras_deterministic_and_validate(vlm):
  loss = RMU(layer=2, steering=7.0)
  spec = types.SimpleNamespace(config=vlm.cfg)
  a = np.asarray(loss.init_extras(spec, 0)["control"])
  np.testing.assert_array_equal(a, np.asarray(loss.init_extras(spec, 0)["control"]))
  assert not np.allclose(a, np.asarray(loss.init_extras(spec, 1)["control"]))
  assert a.shape == (WIDTH,)
  np.testing.assert_allclose(np.linalg.norm(a), 7.0, rtol=1e-5)
  loss.validate(vlm.cfg)
  RMU(layer=0).validate(vlm.cfg)
  RMU(layer=DEPTH - 1).validate(vlm.cfg)
  for bad in (DEPTH, DEPTH + 3, -1):
    with pytest.raises(ValueError, match="out of range"):
      RMU(layer=bad).validate(vlm.cfg)


# --------------------------------------------------------------------------- RMU object
RMU_LAYER, RMU_STEERING, RMU_ALPHA = 1, 3.0, 3.0
RMU_CONFIG = dict(name="rmu", layer=RMU_LAYER, steering=RMU_STEERING, mask="answer", alpha=RMU_ALPHA, ft_weight=1.0)


def rmu_extras(vlm):
  return make_loss(RMU_CONFIG).init_extras(types.SimpleNamespace(config=vlm.cfg), 0)


def test_rmu_at_zero_hidden_state(vlm):
  """All-zero parameters keep the residual stream at 0: forget = ||c u||^2 / D = c^2 / D, uniform logits."""
  zeros = jax.tree.map(jnp.zeros_like, vlm.params)
  value, m = call(vlm, RMU_CONFIG, zeros, zeros, rmu_extras(vlm))
  np.testing.assert_allclose(m["forget"], RMU_STEERING ** 2 / WIDTH, rtol=1e-5)
  assert m["forget_act_norm"] == 0.0
  assert m["retain"] == 0.0
  np.testing.assert_allclose(m["ft"], math.log(VOCAB), rtol=1e-5)
  np.testing.assert_allclose(value, m["forget"] + RMU_ALPHA * m["retain"] + m["ft"], rtol=1e-5)


def test_rmu_terms_on_random_model(vlm):
  extras = rmu_extras(vlm)
  value, same = call(vlm, RMU_CONFIG, vlm.params, vlm.params, extras)
  assert same["retain"] < 1e-10  # policy == frozen reference
  # The forget term (forward stopped after `layer`) is the masked MSE of the collected layer-l state.
  _, _, _, layers = scored(vlm, vlm.params, FORGET, collect=(RMU_LAYER,))
  want = float(rmu.masked_mse(jnp.asarray(layers[RMU_LAYER]), extras["control"],
                              rmu.position_mask(FORGET, "answer", IMAGE_ID)))
  np.testing.assert_allclose(same["forget"], want, rtol=1e-5)
  assert same["forget"] > 0
  _, _, retain_nll, _ = scored(vlm, vlm.params, RETAIN)
  np.testing.assert_allclose(same["ft"], retain_nll, rtol=1e-5)
  np.testing.assert_allclose(value, same["forget"] + RMU_ALPHA * same["retain"] + same["ft"], rtol=1e-5)
  _, diff = call(vlm, RMU_CONFIG, vlm.params, vlm.other, extras)
  assert diff["retain"] > 1e-6
  # retain = masked MSE between the policy's and the frozen model's layer-l states on the retain batch.
  _, _, _, pol = scored(vlm, vlm.params, RETAIN, collect=(RMU_LAYER,))
  _, _, _, ref = scored(vlm, vlm.other, RETAIN, collect=(RMU_LAYER,))
  mask = rmu.position_mask(RETAIN, "answer", IMAGE_ID)
  want = float(rmu.masked_mse(jnp.asarray(pol[RMU_LAYER]), jnp.asarray(ref[RMU_LAYER]), mask))
  np.testing.assert_allclose(diff["retain"], want, rtol=1e-4)
  every = float(rmu.masked_mse(jnp.asarray(pol[RMU_LAYER]), jnp.asarray(ref[RMU_LAYER]),
                               rmu.position_mask(RETAIN, "all", IMAGE_ID)))
  assert abs(every - want) > 1e-3 * want  # the mask matters
  np.testing.assert_allclose(diff["forget"], same["forget"], rtol=1e-6)  # forget never sees the reference


# --------------------------------------------------------------------------- GradDiff, SimNPO, composite
GD_CONFIG = dict(name="graddiff", alpha=0.5, ft_weight=2.0)


def test_graddiff_forget_is_negative_nll(vlm):
  assert not make_loss(GD_CONFIG).needs_reference
  value, m = call(vlm, GD_CONFIG, vlm.params)
  _, _, forget_nll, _ = scored(vlm, vlm.params, FORGET)
  _, _, retain_nll, _ = scored(vlm, vlm.params, RETAIN)
  np.testing.assert_allclose(m["forget"], -forget_nll, rtol=1e-5)
  np.testing.assert_allclose(m["forget_nll"], forget_nll, rtol=1e-5)
  np.testing.assert_allclose(m["retain"], retain_nll, rtol=1e-5)
  np.testing.assert_allclose(value, -forget_nll + 0.5 * retain_nll + 2.0 * retain_nll, rtol=1e-5)


def test_simnpo_matches_formula(vlm):
  beta, gamma = 0.3, 0.7
  config = dict(name="simnpo", beta=beta, gamma=gamma)
  assert not make_loss(config).needs_reference
  value, m = call(vlm, config, vlm.params)
  logp, n, _, _ = scored(vlm, vlm.params, FORGET)
  mean_logp = logp / n
  # -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma) = (2/beta) softplus(beta mean_logp + gamma)
  np.testing.assert_allclose(m["forget"], np.mean((2.0 / beta) * _softplus(beta * mean_logp + gamma)), rtol=1e-4)
  np.testing.assert_allclose(m["forget_mean_logp"], mean_logp.mean(), rtol=1e-5)
  np.testing.assert_allclose(value, m["forget"] + m["retain"] + m["ft"], rtol=1e-5)
  # gamma enters: the gamma = 0 value is different.
  assert abs(np.mean((2.0 / beta) * _softplus(beta * mean_logp)) - m["forget"]) > 1e-3
  with pytest.raises(ValueError, match="beta"):
    make_loss(dict(name="simnpo", beta=-1.0))


def test_composite_ft_weight_zero_removes_the_ce_term(vlm):
  with_ft, m1 = call(vlm, GD_CONFIG, vlm.params)
  without, m0 = call(vlm, {**GD_CONFIG, "ft_weight": 0.0}, vlm.params)
  assert m0["ft"] > 0  # still logged
  np.testing.assert_allclose(without, m0["forget"] + 0.5 * m0["retain"], rtol=1e-6)
  np.testing.assert_allclose(with_ft - without, 2.0 * m1["ft"], rtol=1e-5)


@pytest.mark.parametrize("name", ["npo", "rmu", "graddiff", "simnpo"])
@pytest.mark.parametrize("key", ["alpha", "ft_weight"])
def test_negative_weights_rejected(name, key):
  assert name in LOSSES
  required = {"layer": 1} if name == "rmu" else {}
  with pytest.raises(ConfigError, match=">= 0"):
    make_loss({"name": name, **required, key: -0.5})
  loss = make_loss({"name": name, **required, key: 0.0})
  assert (loss.alpha, loss.ft_weight) == (0.0 if key == "alpha" else 1.0, 0.0 if key == "ft_weight" else 1.0)


def test_score_rejects_unknown_target():
  with pytest.raises(ValueError, match="scoring target"):
    composite.score(None, FORGET, target="image")


# --------------------------------------------------------------------------- typed losses
def test_unknown_loss_key_names_the_loss_and_its_keys():
  """`--config.loss.name=rmu` on the NPO config: NPO's keys are refused, not silently ignored."""
  from mirage_jax import configlib
  config = configlib.apply_overrides(configlib.load("configs/unlearn/npo.py:tiny"), ["--config.loss.name=rmu"])
  with pytest.raises(ConfigError, match=r"loss 'rmu' does not define beta, forget_input, normalize, "
                                        r"reference_cache, retain; its keys are: name, logprob_impl, alpha, "
                                        r"ft_weight, layer, steering, mask"):
    make_loss(config.loss)
  with pytest.raises(ConfigError, match=r"loss 'rmu' needs loss.layer"):
    make_loss(dict(name="rmu"))
  with pytest.raises(ConfigError, match="unknown loss.name 'dpo'"):
    make_loss(dict(name="dpo"))


def test_loss_defaults_live_in_the_dataclass_fields():
  """One place for every default: the fields. Shared keys are declared once, in the base classes."""
  import dataclasses
  from mirage_jax.losses import base
  for name, cls in LOSSES.items():
    assert dataclasses.is_dataclass(cls) and cls.name == name
    required = {"layer": 1} if name == "rmu" else {}
    loss = make_loss({"name": name, **required})
    for f in dataclasses.fields(cls):
      if f.name not in required:
        assert getattr(loss, f.name) == f.default, (name, f.name)
    own = set(cls.__dict__.get("__annotations__", {}))
    assert not own & {"logprob_impl", "alpha", "ft_weight"}, name  # inherited, never redeclared
    with pytest.raises(dataclasses.FrozenInstanceError):
      loss.logprob_impl = "reference"
    with pytest.raises(TypeError):
      cls({"name": name})  # keyword-only
  assert set(base.Loss.__dict__["__annotations__"]) >= {"logprob_impl"}
  assert {"alpha", "ft_weight"} <= set(composite.Unlearning.__dict__["__annotations__"])
  assert make_loss(dict(name="npo")).beta == npo.NPO.__dataclass_fields__["beta"].default == 0.5


def test_loss_string_choices_are_enums_validated_at_construction():
  loss = make_loss(npo_config(normalize="mean_token", forget_input="query", retain="kl"))
  assert loss.normalize is npo.Normalize.MEAN_TOKEN and loss.normalize == "mean_token"
  assert loss.forget_input is npo.ForgetInput.QUERY and loss.retain is npo.Retain.KL
  with pytest.raises(ConfigError, match=r"loss.normalize='token'; valid: \('sum', 'mean_token'\)"):
    npo.NPO(normalize="token")
  with pytest.raises(ConfigError, match="loss.mask='padding'"):
    RMU(layer=1, mask="padding")
  with pytest.raises(ConfigError, match="logprob_impl"):
    make_loss(dict(name="sft", logprob_impl="nope"))
  with pytest.raises(ConfigError, match="loss.beta='x': expected a float"):
    make_loss(dict(name="npo", beta="x"))
  assert make_loss(dict(name="npo", beta=1)).beta == 1.0 and isinstance(make_loss(dict(name="npo", beta=1)).beta, float)


def test_loss_protocol_declares_what_the_loop_needs():
  sft, rmu_loss = make_loss(dict(name="sft")), RMU(layer=1)
  assert sft.streams == ("train",) and not sft.needs_reference and sft.cache is None
  assert sft.decoder_layers is None and sft.init_extras(None, 0) == {}
  cached = make_loss(npo_config(reference_cache=True))
  assert cached.cache.stream == "forget" and cached.cache.keys == ("ref_logp", "n_tokens")
  assert cached.cache.key("ref_logp") == "cache/forget/ref_logp"
  assert make_loss(npo_config()).cache is None
  assert rmu_loss.needs_reference and rmu_loss.streams == ("forget", "retain")


@pytest.mark.parametrize("layer,expected", [(0, (0,)), (1, (0, 1)), (2, (0, 1, 2)), (3, (1, 2, 3)), (7, (5, 6, 7))])
def test_rmu_layer_alone_decides_the_trained_layers(layer, expected):
  assert RMU(layer=layer).decoder_layers == expected
