"""A plain Flower + Opacus app: the baseline bench/opacus_comparison.py measures fedpriv against."""
