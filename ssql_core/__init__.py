"""ssql_core: quantization-friendly self-supervised pretraining (SSQL) and its baselines.

The library is usable on its own (Python API and the ``ssql-core`` command line); it imports
nothing from the service packages (``api``, ``worker``, ``persistence``).
"""

from ssql_core.bits import PAPER_BITS, BitWidth, parse_bits

__all__ = ["BitWidth", "parse_bits", "PAPER_BITS"]
__version__ = "0.1.0"
