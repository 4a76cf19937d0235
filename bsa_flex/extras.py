"""Optional extras, imported where they are used: matplotlib, tqdm, and the record of the machine
a measurement ran on. Nothing in the core imports this module."""
from __future__ import annotations

import datetime
import sys

import torch

__all__ = ["pyplot", "pyplot_or_none", "progress", "environment"]


def pyplot(user: str, extra: str = "viz"):
    """matplotlib.pyplot (Agg backend), or an ImportError saying which extra to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(f"{user} needs matplotlib: pip install 'bsa-flex[{extra}]'") from error
    return plt


def pyplot_or_none():
    """matplotlib.pyplot (Agg backend), or None where matplotlib is not installed."""
    try:
        return pyplot("plotting")
    except ImportError:
        return None


class _Count:
    """A progress line per step where tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"{self.desc}: {self.done}/{self.total}", flush=True)

    def close(self) -> None:
        pass


def progress(total: int, desc: str, *, quiet_without_tqdm: bool = False):
    """A progress bar with update() and close(): tqdm's, else a printed count (or None if quiet)."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        return None if quiet_without_tqdm else _Count(total, desc)


def environment(device: torch.device) -> dict:
    """Date, versions and card of a measurement."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "device": str(device), "python": sys.version.split()[0]}
    if device.type == "cuda":
        import triton
        info.update(card=torch.cuda.get_device_name(device), triton=triton.__version__,
                    device_id=str(getattr(torch.cuda.get_device_properties(device), "uuid", device)))
    else:
        info.update(card="CPU", device_id="cpu")
    return info
