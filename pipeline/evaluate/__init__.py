"""Stage evaluate: COCO AP and proposal recall with pycocotools, the DVC outputs, the registry."""
