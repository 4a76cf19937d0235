"""bsa-flex: Bidirectional Sparse Attention for video diffusion transformers on FlexAttention."""
import importlib.util as _util
import os as _os


def _check_masks_is_ours() -> None:
    """bsa_flex's lower layer is the top-level package ``masks`` beside it; a file or package of that
    name earlier on sys.path (a masks.py in the working directory, say) would shadow it."""
    ours = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "masks", "__init__.py")
    spec = _util.find_spec("masks")
    found = None if spec is None else spec.origin
    if found is None or _os.path.abspath(found) != ours:
        raise ImportError(f"bsa_flex needs its own 'masks' package ({ours}), but 'import masks' finds "
                          f"{found or 'nothing'}: rename or move that file or package (it shadows bsa_flex's "
                          f"masks), or run from another directory")


_check_masks_is_ours()
from .attention import BSARecompileWarning, attention  # noqa: E402
from .config import BSAConfig
from .modules import BSAttention, LayerStats, layer_stats, rope_3d
from .order import TokenOrder, tile_order
from .paths import BSAEagerWarning
from .schedule import FlowTimeSplit, LayerSparsity, SparsitySchedule
from .stats import BSAStats

__all__ = ["attention", "BSAConfig", "BSAStats", "BSARecompileWarning", "BSAEagerWarning", "BSAttention",
           "LayerStats", "layer_stats", "rope_3d", "SparsitySchedule", "FlowTimeSplit", "LayerSparsity", "TokenOrder",
           "tile_order"]
__version__ = "0.1.0"
