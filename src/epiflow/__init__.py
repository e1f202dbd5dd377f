"""epiflow: an open, reproducible EpiAgent."""
__version__ = "0.1.0"
