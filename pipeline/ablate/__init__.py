"""Stage ablate: the FPN paper's ablation tables, trained and evaluated side by side."""
