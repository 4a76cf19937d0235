"""bsa-flex: Bidirectional Sparse Attention for video diffusion transformers on FlexAttention."""
from .attention import BSARecompileWarning, attention
from .config import BSAConfig
from .paths import BSAEagerWarning
from .stats import BSAStats

__all__ = ["attention", "BSAConfig", "BSAStats", "BSARecompileWarning", "BSAEagerWarning"]
__version__ = "0.1.0"
