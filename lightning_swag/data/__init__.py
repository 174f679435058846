"""DataModules of the reference experiments."""

from lightning_swag.data.sine import SineDataModule, sine_function

__all__ = ["SineDataModule", "sine_function"]
