"""dalign: align a small language model by distillation, the Zephyr way (dSFT, AI feedback, dDPO, evaluation)."""

__version__ = "0.1.0"
