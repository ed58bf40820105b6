"""Every named seed stream in genmem, in one place.

A draw takes its seed as ``derive_seed(run_seed, stream, *indices)``: the run's seed, the stream
that names what is drawn, and the indices that make each draw its own (a step, a generation, a
sample). Two draws of one run are independent because their streams differ, so a stream's number
is part of a result's identity: changing one changes every figure drawn from it. The numbers are
the ones each module used before they were gathered here (several consumers reuse small numbers;
they never share a run seed with one another in the same derivation, and results are unchanged).

Each consumer has its own enum, so ``Unlearn.EVAL`` reads as what it is where it is used.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["AdjointMatching", "Finetune", "Healing", "Posterior", "Retrain", "SizeStudy", "Training", "Unlearn", "UnlearningProxy"]


class Training(IntEnum):
    """The training loop (genmem.training): which rows each epoch reads, the noise and times of
    each step, torch's global stream inside a step (dropout), the initial weights."""

    DATA = 1
    NOISE = 2
    TORCH = 3
    INIT = 4
    GRID = 20_240_101  # the periodic sample grid: a fixed seed, not derived, so grids compare across runs
    PROBE = 7_700_001  # the memorisation probe's samples: fixed, so successive probes differ only by the weights


class Healing(IntEnum):
    """A run that heals itself at its memorisation budget (genmem.methods.healing): the k-th
    heal's samples (measured before and after it) and its unlearning step's batches."""

    SAMPLES = 31
    STEP = 32


class UnlearningProxy(IntEnum):
    """Energy-weighted flow matching (genmem.methods.unlearning): flow mode's (source, target)
    pairing and the proxy classifier's initial weights and batches."""

    PAIR = 11
    PROXY = 12


class AdjointMatching(IntEnum):
    """Reward fine-tuning's objective (genmem.methods.finetune): the chain's noise per step and
    which chain steps enter each batch's loss."""

    NOISE = 41
    STEPS = 42


class Unlearn(IntEnum):
    """The unlearn job: base samples it trains on, flow mode's independent source samples, the
    samples compared before and after, the proxy, the probes during training (samples
    independent of the final comparison's, so the stop does not select the figure reported),
    the kept data subset and bootstrap of the goal's kept distance."""

    BASE = 1
    SOURCE = 2
    EVAL = 3
    PROXY = 4
    PROBE = 5
    KEPT = 6


class Finetune(IntEnum):
    """The finetune job: the samples compared before and after, the resampling into the exact
    p*, the path-KL rollout, the probes during training."""

    EVAL = 1
    TARGET = 2
    KL = 3
    PROBE = 4


class Retrain(IntEnum):
    """Self-consuming retraining: each generation's training seed, its samples, and which of them
    join the next generation's data."""

    TRAIN = 1
    SAMPLE = 2
    SELECT = 3


class SizeStudy(IntEnum):
    """Memorisation against training-set size: each size's samples and the points its learned
    dimension is measured at."""

    SAMPLE = 1
    POINTS = 2


class Posterior(IntEnum):
    """The posterior job: the k-th weight sample of every arm (the same seeds across arms, so
    arms differ only by their geometry and scale)."""

    WEIGHTS = 17
