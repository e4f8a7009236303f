"""Knowledge-distillation recovery: fine-tune a compressed model against its uncompressed teacher with the
compression structure fixed (ranks, masks, sharing, quantisation grids), then re-quantise to the same bytes."""

from __future__ import annotations

from slimformer.compression.records import RecoveryRecord
from slimformer.recovery.config import RecoverStageConfig, RecoveryConfig
from slimformer.recovery.recover import RecoveryResult, recover

__all__ = ["RecoverStageConfig", "RecoveryConfig", "RecoveryRecord", "RecoveryResult", "recover"]
