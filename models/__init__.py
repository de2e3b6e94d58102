"""MammoLab models: Keras builders, datasets, training, evaluation and export to LiteRT bundles.

Importing this package itself is cheap; TensorFlow/Keras load only in the submodules that need them.
"""
