"""mengzi_ray: Mengzi-Oscar (Chinese Oscar/VinVL) training and serving on Ray.

Importing the package starts nothing: no Ray, no model loading, no network.
"""

__version__ = "0.1.0"
