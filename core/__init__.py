"""MammoLab core: reading mammograms, preprocessing, LiteRT inference, batch jobs.

Depends on numpy, pydicom, OpenCV and LiteRT only: never on Qt, TensorFlow or Keras
(``tests/core/test_layering.py`` enforces it).
"""

__version__ = "0.1.0"
