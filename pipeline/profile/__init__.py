"""Stage profile: latency, memory and the time split, beside torchvision's Faster R-CNN."""
