"""The paper's experiments, one module each; every one writes numbers (JSON) and a figure (PNG)."""
