"""clipkit's own exceptions, in a module that imports nothing, so that the command line can name them
without loading torch."""

from __future__ import annotations


class ClipkitError(Exception):
    """A problem with the user's data or setup that one line explains: the command line prints the
    message, without a traceback, and exits with status 2."""


class DataError(ClipkitError):
    """Training or evaluation data that cannot be used as given: missing shards, no readable sample,
    class labels that are not there."""


class LostRanksError(ClipkitError):
    """A rank of a distributed job could not reach the others: one died, or stopped answering within
    the collective timeout."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be found, fetched or fitted to the model."""
