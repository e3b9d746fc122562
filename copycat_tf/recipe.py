"""The attack's hyper-parameters, with the one set of defaults the whole tool uses.

`TrainConfig` is how one model is trained (the trainer's settings; its hyper-parameters
have no defaults of their own). `Recipe` is what an attacker chooses: what to send (NPD
source, budget, batching, label mode, preparation) and how to train the copycat on the
answers. `TargetRecipe` is how the experiments
train the target they attack. The verbs' flags, the demo, the study and the benchmarks
all start from these defaults; flagfiles and command lines override them. No other
module holds a literal hyper-parameter.
"""

from __future__ import annotations

import dataclasses
import math
import os


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train; shared by train_target and train_copycat.

    Attributes:
      epochs: total epochs (a resumed run trains only the missing ones).
      batch_size: global batch size (split over replicas by the strategy).
      learning_rate: peak learning rate of AdamW with cosine decay.
      weight_decay: AdamW decoupled weight decay.
      augment: name of a training augmenter (data.augment.AUGMENTERS).
      seed: shuffling, augmentation and initialisation seed.
      warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay.
      patience: stop after this many epochs without a better eval metric (0: never);
        the best epoch's weights are kept either way.
      shuffle_buffer: examples in the shuffle buffer.
      monitor: eval metric that selects the best epoch ("accuracy" or "macro_f1").
      verbose: Keras fit verbosity (0 silent, 1 progress bar, 2 one line per epoch).
      soft_labels: training targets are score vectors (distillation loss: cross-entropy
        against the target's probabilities) instead of integer labels.
      cache: keep the decoded training examples in memory (off when the caller's dataset
        changes between epochs, e.g. class-balanced resampling).
      mixup: alpha of mixup of training batches (data.batches.training_batches; 0: off);
        the loss is then against score vectors, as with soft labels.
      min_steps: train for at least this many optimizer steps: when `epochs` epochs of
        the training set are fewer steps, epochs, patience and warm-up grow in proportion
        (`stretched`); 0: `epochs` as given.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    augment: str
    seed: int
    warmup_epochs: float
    patience: int
    shuffle_buffer: int = 10_000
    monitor: str = "accuracy"
    verbose: int = 2
    soft_labels: bool = False
    cache: bool = True
    mixup: float = 0.0
    min_steps: int = 0

    def stretched(self, steps_per_epoch: int) -> TrainConfig:
        """This config with at least `min_steps` optimizer steps at `steps_per_epoch`."""
        epochs = max(self.epochs, math.ceil(self.min_steps / max(1, steps_per_epoch)))
        if epochs == self.epochs:
            return self
        factor = epochs / self.epochs
        return dataclasses.replace(
            self,
            epochs=epochs,
            patience=math.ceil(self.patience * factor),
            warmup_epochs=self.warmup_epochs * factor,
        )


# Natural NPD images on Debian/Ubuntu (package openclipart-png).
NATURAL_NPD = "/usr/share/openclipart/png"
FALLBACK_NPD = "synthetic:shapes"


def default_npd() -> str:
    """Natural images when the Debian openclipart-png pictures are there, else the data-free
    generator."""
    if os.path.isdir(NATURAL_NPD) and os.listdir(NATURAL_NPD):
        return f"folder:{NATURAL_NPD}"
    return FALLBACK_NPD


# Recipe fields only the copycat's training reads: a fake dataset does not depend on them.
TRAINING_FIELDS = (
    "model",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "augment",
    "mixup",
    "warmup_epochs",
    "patience",
    "min_steps",
    "balance",
    "max_replication",
    "holdout_percent",
    "finetune_epochs",
    "finetune_learning_rate",
    "precision",
)
# Recipe fields only the NPD+PD fine-tuning stage reads.
FINETUNE_FIELDS = ("finetune_epochs", "finetune_learning_rate")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One attack: what is sent to the target and how the copycat learns from the answers.

    Attributes:
      npd: NPD spec ("" = `default_npd()`).
      query_budget: images the target answers.
      query_batch_size: images per request.
      max_in_flight: concurrent requests.
      crops_per_image: NPD items per source picture (in one pass over a folder).
      npd_background, npd_invert, npd_jitter, npd_jitter_on, npd_blur, npd_crop_area,
        npd_crop_aspect, npd_cycle, npd_adapt_after: how natural pictures are prepared for
        the target (data.preparation).
      invariance_probe: N > 0 sends mirrored and one-pixel-shifted copies of the first N
        items (3N queries in all, every answer training data) to learn whether the target
        is mirror-invariant (data.invariance); 0: none. Off by default: the flips it turns
        on (augment "auto") did not gain consistently against the Fashion-MNIST target
        (experiments/fashion_mnist/RESULTS.md, copycat part).
      selection: which NPD items are sent (attack.selection.SELECTIONS). class_balance
        with half of each round drawn at random is the default: against the Fashion-MNIST
        target it copied more than random order at 50,000 queries
        (experiments/fashion_mnist/RESULTS.md, "Query selection" and "The recipe's
        defaults"), for a steal about seven times longer (a scout and a pool per round).
        random: the stream in order (a --runner or --num_shards steal, the quick demo).
      selection_pool: candidates a query selection scores at most.
      selection_round: queries a selection round chooses (0: an eighth of the budget, at
        least npd_adapt_after).
      selection_random: share of each selection round's queries drawn at random from its
        pool, the rest chosen by the strategy (0: all by the strategy; without rounds,
        selection random, it means nothing and is recorded as 0).
      selection_reuse: a round takes the round before's unchosen candidates over and
        warm-starts its scout from the round before's (faster rounds; fewer distinct
        candidates in all).
      selection_warm_start: a round's scout starts from the round before's (fewer steps)
        while its pool stays fresh (implied by selection_reuse).
      label_mode: what is kept of each answer: hard, topk:K or scores.
      model: copycat architecture (models.registry). deep_cnn (small_cnn, the target's
        architecture, with two more blocks) fits the target's answers on NPD images
        better when there are many: on the same steal of 50,000 queries from the
        Fashion-MNIST target it copied 91.2 % of the target's accuracy where small_cnn
        copied 89.5 % (experiments/fashion_mnist/RESULTS.md, "The recipe's defaults"), for
        about 1.5x the training time; at 5,000 and 10,000 queries the two tie (78.8 and
        85.7 % against 79.5 and 87.1 %). --model=small_cnn trains a small budget's copy
        faster.
      epochs, batch_size, learning_rate, weight_decay, augment: copycat training
        (augment "auto": flips when the fake dataset's invariance probe finds the target
        mirror-invariant, else none; needs a steal with invariance_probe).
      mixup: alpha of mixup of the copycat's training batches (0: off).
      warmup_epochs: learning-rate warm-up before the cosine decay.
      patience: epochs without better hold-out agreement before training stops (0: never,
        the default: the learning rate decays over all the epochs, and a stop while it was
        still high, at epoch 6 of 10, copied 88.6 % of the target's accuracy where the 10
        epochs copied 91.6 %, same steal of 50,000 queries, experiments/fashion_mnist; the
        best epoch by hold-out agreement is kept either way).
      min_steps: optimizer steps the copycat trains at least: a small fake dataset gets
        more epochs (and patience) than `epochs`, so a small budget's copy is not
        under-trained (TrainConfig.stretched).
      balance: class balancing of the stolen labels (data.balance).
      max_replication: no class is shown more than this many times its own records per
        epoch (0: no cap).
      holdout_percent: share of the fake dataset held out for model selection.
      finetune_epochs, finetune_learning_rate: the NPD+PD fine-tuning stage.
      precision: mixed-precision policy (training.runtime.PRECISIONS).
      seed: one seed for NPD order, crops and training.
    """

    npd: str = ""
    query_budget: int = 50_000
    query_batch_size: int = 256
    max_in_flight: int = 4
    crops_per_image: int = 8
    npd_background: str = "random"
    npd_invert: float = 0.5
    npd_jitter: float = 0.3
    npd_jitter_on: str = "picture"
    npd_blur: float = 0.2
    npd_crop_area: str = "0.02,1.0"
    npd_crop_aspect: str = "0.75,1.33"
    npd_cycle: bool = True
    npd_adapt_after: int = 2048
    invariance_probe: int = 0
    selection: str = "class_balance"
    selection_pool: int = 100_000
    selection_round: int = 0
    selection_random: float = 0.5
    selection_reuse: bool = False
    selection_warm_start: bool = False
    label_mode: str = "hard"
    model: str = "deep_cnn"
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    augment: str = "none"
    mixup: float = 0.0
    warmup_epochs: float = 0.0
    patience: int = 0
    min_steps: int = 5_000
    balance: str = "replicate"
    max_replication: float = 0.0
    holdout_percent: int = 5
    finetune_epochs: int = 10
    finetune_learning_rate: float = 1e-3
    precision: str = "auto"
    seed: int = 0

    def resolved_npd(self) -> str:
        return self.npd or default_npd()

    def train_config(self, verbose: int = 2) -> TrainConfig:
        """The copycat's training on the NPD fake dataset."""
        return _train_config(self, verbose)

    def finetune_config(self, verbose: int = 2) -> TrainConfig:
        """The NPD+PD stage: the same training at a lower learning rate, for its epochs
        (min_steps is the NPD stage's)."""
        return dataclasses.replace(
            self.train_config(verbose),
            epochs=self.finetune_epochs,
            learning_rate=self.finetune_learning_rate,
            min_steps=0,
        )

    def quick(self) -> Recipe:
        """A first look in under three minutes on 2 CPU cores (the demo's --quick): 20,000
        queries in random order and 5 epochs of small_cnn (5,000 queries and 2 epochs took
        half the time and copied far less: 58.7 % of the target's accuracy against 83.0 %;
        a selection's rounds would add minutes of scout training; min_steps would triple
        its training; deep_cnn copied 89.3 % but took 4.0 minutes, its training 133 s)."""
        return dataclasses.replace(
            self,
            query_budget=20_000,
            epochs=5,
            selection="random",
            min_steps=0,
            model="small_cnn",
        )


@dataclasses.dataclass(frozen=True)
class TargetRecipe:
    """How the experiments train the target (the model under attack)."""

    model: str = "small_cnn"
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    augment: str = "flip"
    mixup: float = 0.0
    warmup_epochs: float = 0.0
    patience: int = 0
    min_steps: int = 0
    precision: str = "auto"
    seed: int = 0

    def train_config(self, verbose: int = 2) -> TrainConfig:
        return _train_config(self, verbose)

    def quick(self) -> TargetRecipe:
        return dataclasses.replace(self, epochs=2)


def _train_config(recipe: Recipe | TargetRecipe, verbose: int) -> TrainConfig:
    return TrainConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        augment=recipe.augment,
        seed=recipe.seed,
        warmup_epochs=recipe.warmup_epochs,
        patience=recipe.patience,
        verbose=verbose,
        mixup=recipe.mixup,
        min_steps=recipe.min_steps,
    )
