"""The detector of "Feature Pyramid Networks for Object Detection" (Lin et al., CVPR 2017).

Public interface: `ModelConfig`, `build_detector`, `load_torchvision_weights`, `Detector`.
"""

from fpn.config import ModelConfig
from fpn.detector import Detector, build_detector
from fpn.torchvision_weights import load_torchvision_weights

__all__ = ["Detector", "ModelConfig", "build_detector", "load_torchvision_weights"]
