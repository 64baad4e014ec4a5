"""FL algorithms as registered parts: client loss terms and server steps.

Importing this package registers every part, so configs can name them.
"""

from mmfed.algorithms import (  # noqa: F401  (registration)
    creamfl,
    distill,
    fedafd,
    fedavg,
    fedddpm,
    feddifrc,
    fedopt,
    moon,
    prox,
    semanticfl,
    task,
    teacher_space,
)
