"""avsa: audio-visual spatial alignment from 360° video."""
__version__ = "0.1.0"
