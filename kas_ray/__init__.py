"""kas-ray: a coalition Key Access Service for NATO ACP-240 data-centric security."""

__version__ = "0.1.0"
