"""Label stages, one registry: correspond, maskclip, sam, refine."""
from .base import STAGES, Shard, ShardContext, Stage, build_stage, sha256_file

__all__ = ["STAGES", "Shard", "ShardContext", "Stage", "build_stage", "sha256_file"]
