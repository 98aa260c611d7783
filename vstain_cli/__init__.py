"""vstain: virtual H&E staining of autofluorescence slides with conditional diffusion."""

__version__ = "0.1.0"
