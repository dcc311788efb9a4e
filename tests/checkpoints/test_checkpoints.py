"""The training workdir's Orbax layout: a step restores whole, or its parameters alone, and the
best-ranked step is the one served."""

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.checkpoints import orbax_layout
from decoderjax.training.steps import TrainState


def make_state(step: int, value: float) -> TrainState:
  params = {"w": jnp.full((2, 3), value), "b": jnp.arange(3.0) + value}
  opt_state = {"mu": jnp.full((2, 3), -value)}
  rng = jax.random.key_data(jax.random.key(step))
  return TrainState(jnp.asarray(step, jnp.int32), params, opt_state, rng)


def test_steps_restore_whole_or_as_parameters_and_the_best_is_served(tmp_path):
  mngr = orbax_layout.manager(str(tmp_path), keep=3)
  states = {1: make_state(1, 1.0), 2: make_state(2, 2.0), 3: make_state(3, 3.0)}
  for step, state in states.items():  # step 2 has the lowest objective
    orbax_layout.save(mngr, step, state, {orbax_layout.BEST_METRIC: abs(step - 2) + 0.5})
  mngr.wait_until_finished()
  abstract = jax.eval_shape(lambda: states[1])
  restored = orbax_layout.restore(mngr, 3, abstract)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[3]), strict=True):
    np.testing.assert_array_equal(a, b)
  params = orbax_layout.restore_params(mngr, 1, abstract.params)
  np.testing.assert_array_equal(params["w"], states[1].params["w"])
  assert orbax_layout.best_or_latest(mngr) == 2
  mngr.close()
  with orbax_layout.manager(str(tmp_path), read_only=True) as again:
    assert again.latest_step() == 3 and orbax_layout.best_or_latest(again) == 2


def test_without_evaluations_the_latest_step_is_served(tmp_path):
  mngr = orbax_layout.manager(str(tmp_path), keep=2)
  assert orbax_layout.best_or_latest(mngr) is None
  for step in (5, 6):
    orbax_layout.save(mngr, step, make_state(step, float(step)))
  mngr.wait_until_finished()
  assert orbax_layout.best_or_latest(mngr) == 6
  mngr.close()
