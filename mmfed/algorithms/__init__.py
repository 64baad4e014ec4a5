"""FL algorithms as registered parts: client loss terms and server steps.

Importing this package registers every part, so configs can name them.
"""

from mmfed.algorithms import creamfl, distill, fedafd, fedavg, moon, prox, task  # noqa: F401  (registration)
