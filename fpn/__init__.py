"""The detector of "Feature Pyramid Networks for Object Detection" (Lin et al., CVPR 2017).

Public interface: `ModelConfig`, `build_detector`, `load_torchvision_weights`.
"""

from fpn.config import ModelConfig

__all__ = ["ModelConfig"]
