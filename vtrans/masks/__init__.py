from vtrans.masks.vib import VIBMask, VIBMasks

__all__ = ["VIBMask", "VIBMasks"]
