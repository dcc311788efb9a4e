"""A training workdir's Orbax checkpoints: each step holds `params` and `train_state` (the step,
the optimizer state and the dropout key), so a model can be read without its optimizer. A train
state is any struct with `step`, `params`, `opt_state` and `rng` (training.steps.TrainState);
this layer does not import training."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

CHECKPOINTS_DIR = "checkpoints"
BEST_METRIC = "objective"  # what the best checkpoint minimizes (val_loss, or -accuracy, ...)


def manager(directory: str, keep: int = 3, keep_best: bool = True, read_only=False):
  """The Orbax manager of a training workdir: keeps the last `keep` steps and the best one."""
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_best:
    policies.append(
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1)
    )
  options = ocp.CheckpointManagerOptions(
    best_fn=lambda m: m[BEST_METRIC],
    best_mode="min",
    preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(directory, CHECKPOINTS_DIR)), options=options
  )


def _rest(state) -> dict:
  """The train state beside its parameters."""
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def save(mngr, step: int, state, metrics: dict | None = None) -> None:
  """Saves `state` as `step` (metrics: what the best-checkpoint policy reads)."""
  args = ocp.args.Composite(
    params=ocp.args.StandardSave(state.params),
    train_state=ocp.args.StandardSave(_rest(state)),
  )
  mngr.save(step, args=args, metrics=metrics, force=True)


def restore(mngr, step: int, abstract):
  """The whole train state of `step`, read straight into `abstract`'s shardings (a train state
  of the same type)."""
  args = ocp.args.Composite(
    params=ocp.args.StandardRestore(abstract.params),
    train_state=ocp.args.StandardRestore(_rest(abstract)),
  )
  restored = mngr.restore(step, args=args)
  rest = restored["train_state"]
  return abstract.replace(
    step=rest["step"], params=restored["params"], opt_state=rest["opt_state"], rng=rest["rng"]
  )


def restore_params(mngr, step: int, abstract_params):
  """The parameters of `step` only (no optimizer state is read)."""
  args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
  return mngr.restore(step, args=args)["params"]


def best_or_latest(mngr) -> int | None:
  """The best step when evaluations ranked them, else the latest; None when there is none."""
  return mngr.best_step() if mngr.best_step() is not None else mngr.latest_step()
