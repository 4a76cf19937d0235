"""bsa-flex: Bidirectional Sparse Attention for video diffusion transformers on FlexAttention."""
from .attention import BSARecompileWarning, attention
from .config import BSAConfig
from .modules import BSAttention, LayerStats, layer_stats, rope_3d
from .paths import BSAEagerWarning
from .schedule import LayerSparsity, SparsitySchedule
from .stats import BSAStats

__all__ = ["attention", "BSAConfig", "BSAStats", "BSARecompileWarning", "BSAEagerWarning", "BSAttention",
           "LayerStats", "layer_stats", "rope_3d", "SparsitySchedule", "LayerSparsity"]
__version__ = "0.1.0"
