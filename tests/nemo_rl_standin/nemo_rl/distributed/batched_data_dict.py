"""``BatchedDataDict``: a dict of per-sample tensors (dim 0 = sample) with NeMo-RL's sharding rule."""

import torch


class BatchedDataDict(dict):
    @property
    def size(self) -> int:
        return next(len(v) for v in self.values() if isinstance(v, torch.Tensor))

    def slice(self, start: int, end: int) -> "BatchedDataDict":
        return BatchedDataDict({k: v[start:end] for k, v in self.items()})

    def select_indices(self, rows) -> "BatchedDataDict":
        return BatchedDataDict({k: v[rows] for k, v in self.items()})

    def to(self, device) -> "BatchedDataDict":
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                self[k] = v.to(device)
        return self

    def shard_by_batch_size(self, shards: int, batch_size=None) -> list["BatchedDataDict"]:
        """NeMo-RL's rule: cut into chunks of ``batch_size`` samples (one optimizer step each), split every chunk
        contiguously over ``shards`` ranks, and give each rank its pieces of every chunk in order."""
        batch_size = batch_size or self.size
        if self.size % batch_size or batch_size % shards:
            raise ValueError(f"cannot shard {self.size} samples in chunks of {batch_size} over {shards} ranks")
        per_rank = batch_size // shards
        out = []
        for rank in range(shards):
            rows = [c + rank * per_rank + i for c in range(0, self.size, batch_size) for i in range(per_rank)]
            out.append(self.select_indices(torch.tensor(rows)))
        return out
