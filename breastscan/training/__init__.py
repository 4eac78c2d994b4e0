"""Training: the fit of one declared model (loop.py) and its distribution strategies (distribute.py)."""
