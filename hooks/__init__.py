"""TransformerLens hook functions that capture only what an analysis needs."""

from icl_lens.hooks.capture import Capture, gather_positions

__all__ = ["Capture", "gather_positions"]
