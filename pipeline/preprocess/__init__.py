"""Stage preprocess: a COCO-layout folder into the training format (`pipeline.dataset`)."""
