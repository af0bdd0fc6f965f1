"""Stage fetch: COCO 2017, the embedded synthetic set or a local folder, into the COCO layout."""
