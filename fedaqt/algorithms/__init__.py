"""Client algorithms: the local computation of one round on the native quantized model (plugins, entry-point
group ``fedaqt.algorithms``). Built in: :class:`~fedaqt.algorithms.fedsgd.FedSGD` (``fedsgd``, uploads one
batch's gradient) and :class:`~fedaqt.algorithms.fedavg.FedAvg` (``fedavg``, local SGD, uploads the delta or
final codes). See :mod:`fedaqt.algorithms.base` for the interface."""

from fedaqt.algorithms.base import ClientAlgorithm, LocalContext, LocalResult

__all__ = ["ClientAlgorithm", "LocalContext", "LocalResult"]
