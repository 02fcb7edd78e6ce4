"""transfusion_pytorch: Transfusion (Zhou et al. 2024) with flow matching, for any number of modalities."""
from .config import ModalityConfig, TransformerConfig, TransfusionConfig
from .display import print_modality_sample
from .transfusion import LossBreakdown, Prediction, Transfusion
from .version import __version__

__all__ = [
    'Transfusion', 'TransfusionConfig', 'TransformerConfig', 'ModalityConfig',
    'LossBreakdown', 'Prediction', 'print_modality_sample', '__version__',
]
