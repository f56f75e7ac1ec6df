"""lightning_clara: CLARA (Cumulative Learning Rate Adaptation) for PyTorch and PyTorch Lightning."""

from lightning_clara.controller import CLARA
from lightning_clara.options import CLARAOptions

__version__ = "0.2.0.dev0"

__all__ = ["CLARA", "CLARACallback", "CLARAOptions", "__version__"]


def __getattr__(name: str) -> object:
    # The callback imports Lightning; keep ``from lightning_clara import CLARA`` light.
    if name == "CLARACallback":
        from lightning_clara.callback import CLARACallback

        return CLARACallback
    raise AttributeError(f"module 'lightning_clara' has no attribute {name!r}")
