"""CLARA from a LightningCLI config: a small MLP on scikit-learn's digits, configured by YAML.

``CLARACallback`` is an ordinary Lightning callback, so a LightningCLI config lists it under
``trainer.callbacks`` like any other (see ``examples/config.yaml``)::

    python examples/lightning_cli.py fit --config examples/config.yaml        # ~10 s on 2 CPU cores
    python examples/lightning_cli.py fit --config examples/config.yaml --print_config
    python examples/lightning_cli.py fit --trainer.callbacks.help lightning_clara.CLARACallback
    python examples/lightning_cli.py fit --config examples/config.yaml --trainer.max_epochs=2   # quick

At the end of the fit the callback prints its summary table (lr used at the start and the end,
its range, the mean ratio). Needs scikit-learn (no download: the data set ships with it),
tensorboard for the configured logger, and ``pip install "jsonargparse[signatures]"`` for
LightningCLI (it refuses to start without docstring-parser and typeshed-client).
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# Imported so that ``fit --help`` lists it among the known callbacks and accepts the short name
# (``--trainer.callbacks.help CLARACallback``); the config refers to it by its class_path.
from lightning_clara import CLARACallback  # noqa: F401

NUM_CLASSES = 10


class DigitsClassifier(L.LightningModule):
    """A 64-hidden-10 MLP trained with plain SGD; CLARA (from the config) adapts its learning rate.

    Args:
        lr: the SGD learning rate (the scheduled one; CLARA multiplies it by its factor F).
        hidden: width of the hidden layer.
    """

    def __init__(self, lr: float = 1e-4, hidden: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one mini-batch."""
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy."""
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD at the configured (deliberately small) learning rate."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's bundled digits (1,797 8x8 images): a stratified train/validation split, standardised.

    Args:
        batch_size: training batch size.
        val_fraction: share of the samples held out for validation.
        seed: seed of the split and of the shuffling.
    """

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        """Split and standardise with the training statistics."""
        x, y = load_digits(return_X_y=True)
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=self.val_fraction, random_state=self.seed, stratify=y
        )
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std[std == 0] = 1.0  # border pixels that are always blank

        def dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
            scaled = torch.tensor((features - mean) / std, dtype=torch.float32)
            return TensorDataset(scaled, torch.tensor(labels, dtype=torch.long))

        self.train_set, self.val_set = dataset(x_train, y_train), dataset(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded)."""
        assert self.train_set is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        """The validation set in large batches."""
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=512)


def quiet_lightning() -> None:
    """Keep the output to the progress bar and CLARA's summary."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    # Lightning 2.6 calls a pytree API that recent torch deprecates, inside its own loops.
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse the command line (or ``args``) and the config, then run the subcommand (``fit``, ...).

    With ``run=False`` there is no subcommand: the model, data module and trainer (with its
    callbacks) are only instantiated from the config.
    """
    quiet_lightning()
    torch.set_num_threads(1)  # a tiny MLP gains nothing from intra-op threads
    return LightningCLI(DigitsClassifier, DigitsDataModule, save_config_kwargs={"overwrite": True}, args=args, run=run)


if __name__ == "__main__":
    main()
