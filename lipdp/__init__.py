"""lipdp: differentially private training of Lipschitz networks without clipping."""

__version__ = "0.1.0"
