"""Errors a user can fix, which the binaries print as one line (cli.run)."""


class TrainingError(Exception):
  """A problem with a training run the user must fix (workdir, shapes, non-finite loss)."""
