"""kcpt: Korean continued pretraining and exam-format tuning on Ray."""

__version__ = "0.1.0"
