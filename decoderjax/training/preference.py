"""Preference losses over (chosen, rejected) pairs, as TRL defines them: DPO (with cDPO's label
smoothing) and IPO against a frozen reference model, SimPO and ORPO without one.

A preference batch packs each pair whole into one row: chosen as segment 2k + 1 and rejected as
2k + 2 of the row's pair slot k (`pair_weights` [B, K] marks the slots that hold a pair)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")
WITH_REFERENCE = ("dpo", "ipo")  # the others compare the policy's own log-probabilities
STATISTICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


def token_logps(logits_BNV, batch):
  """Each column's log-probability of its target, with the batch's weights and segment ids ->
  three [B, N] arrays; logits at the batch's `loss_at` columns when it has them."""
  targets_BN, weights_BN, segments_BN = batch["targets"], batch["weights"], batch["segment_ids"]
  if "loss_at" in batch:
    at_BN = batch["loss_at"]
    targets_BN, weights_BN, segments_BN = (
      jnp.take_along_axis(x, at_BN, axis=1) for x in (targets_BN, weights_BN, segments_BN)
    )
  logits_BNV = logits_BNV.astype(jnp.float32)
  target_BN = jnp.take_along_axis(logits_BNV, targets_BN[..., None], axis=-1)[..., 0]
  return target_BN - jax.nn.logsumexp(logits_BNV, axis=-1), weights_BN, segments_BN


def segment_sums(values_BN, segments_BN, pairs: int):
  """Sums of `values` over each segment of each row -> [B, 2 x pairs]."""
  onehot_BNS = segments_BN[..., None] == jnp.arange(1, 2 * pairs + 1)[None, None]
  return jnp.einsum("BN,BNS->BS", values_BN, onehot_BNS.astype(jnp.float32))


def segment_logps(logits_BNV, batch):
  """Each segment's summed log-probability of its weighted (response) targets, and how many
  there are -> ([B, S], [B, S]), S = 2K."""
  return _response_sums(*token_logps(logits_BNV, batch), batch["pair_weights"].shape[1])


def _response_sums(logp_BN, weights_BN, segments_BN, pairs: int):
  return (
    segment_sums(logp_BN * weights_BN, segments_BN, pairs),
    segment_sums(weights_BN, segments_BN, pairs),
  )


def pair_terms(policy, reference, loss_cfg):
  """Per-pair loss, chosen and rejected rewards [B, K] (TRL's): `policy` and `reference` are
  segment_logps (reference None for SimPO and ORPO)."""
  (logp_BS, count_BS), beta = policy, loss_cfg.beta
  chosen, rejected = logp_BS[:, 0::2], logp_BS[:, 1::2]
  n_chosen, n_rejected = (jnp.maximum(c, 1.0) for c in (count_BS[:, 0::2], count_BS[:, 1::2]))
  smoothing, kind = loss_cfg.label_smoothing, loss_cfg.preference
  smoothed = lambda x: -(1 - smoothing) * jax.nn.log_sigmoid(x) - smoothing * jax.nn.log_sigmoid(-x)
  if kind in WITH_REFERENCE:
    ref_logp_BS = reference[0]
    chosen_ratio = chosen - ref_logp_BS[:, 0::2]
    rejected_ratio = rejected - ref_logp_BS[:, 1::2]
    if kind == "dpo":
      loss = smoothed(beta * (chosen_ratio - rejected_ratio))
    else:  # IPO on per-token log-ratios (TRL's normalization, agreed with IPO's authors)
      loss = jnp.square(chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta))
    return loss, beta * chosen_ratio, beta * rejected_ratio
  chosen_mean, rejected_mean = chosen / n_chosen, rejected / n_rejected
  if kind == "simpo":
    loss = smoothed(beta * (chosen_mean - rejected_mean) - loss_cfg.simpo_gamma)
  else:  # ORPO: the log odds ratio of the mean log-probabilities
    log1mexp = lambda x: jnp.log(-jnp.expm1(jnp.minimum(x, -1e-7)))
    log_odds = chosen_mean - rejected_mean - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    loss = -beta * jax.nn.log_sigmoid(log_odds)
  return loss, beta * chosen_mean, beta * rejected_mean


def preference_loss(logits, batch, reference, loss_cfg):
  """(loss sum, pairs, sums of the logged statistics) of a preference batch: the mean over pairs
  is loss sum / pairs. ORPO adds the NLL of the chosen sequences, prompt and response, as the
  batch's mean over their tokens (TRL's), so its logits cover every column (no `loss_at`)."""
  weights_BK = batch["pair_weights"]
  logp_BN, weights_BN, segments_BN = token_logps(logits, batch)
  k = weights_BK.shape[1]
  policy = _response_sums(logp_BN, weights_BN, segments_BN, k)
  loss_BK, chosen_BK, rejected_BK = pair_terms(policy, reference, loss_cfg)
  pairs = jnp.sum(weights_BK)
  loss_sum = jnp.sum(loss_BK * weights_BK)
  if loss_cfg.preference == "orpo":
    every_BN = (segments_BN != 0).astype(jnp.float32)
    chosen_nll = -jnp.sum(segment_sums(logp_BN * every_BN, segments_BN, k)[:, 0::2])
    chosen_tokens = jnp.sum(segment_sums(every_BN, segments_BN, k)[:, 0::2])
    loss_sum += pairs * chosen_nll / jnp.maximum(chosen_tokens, 1.0)
  total = lambda x_BK: jnp.sum(x_BK * weights_BK)
  won_BK = (chosen_BK > rejected_BK).astype(jnp.float32)
  values = (chosen_BK, rejected_BK, chosen_BK - rejected_BK, won_BK)
  return loss_sum, pairs, {k: total(v) for k, v in zip(STATISTICS, values, strict=True)}
