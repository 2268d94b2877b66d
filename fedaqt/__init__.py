"""fedaqt: federated quantization-aware training simulation (Flower 1.42 + Ray).

See DESIGN.md (shared) and spec/METHODS.md for the methods implemented here.
"""

__version__ = "0.1.0"
