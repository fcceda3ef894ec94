"""Data-parallel scans under torchrun: disjoint shards per rank, one report on rank 0.

``torchrun --nproc-per-node K -m deadrelu scan ...`` (or multi-node torchrun) starts K
processes with RANK/WORLD_SIZE in their environment. Each runs the model on every K-th
batch (round robin over the same batch sequence a single process would see, after the
``--samples`` cap), then the per-site statistics of all ranks are gathered to rank 0 and
merged exactly as `deadrelu merge` does. Rank 0 alone writes the report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from deadrelu.errors import UsageError
from deadrelu.probe import SiteObservation, StreamResult
from deadrelu.stats import UnitStats

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """This process's place in a torchrun job (a single process when not under torchrun)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise UsageError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc
    return Ranks(rank, size, local)


def start(ranks: Ranks, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group (gloo on CPU, nccl on CUDA); the device this rank uses, and
    whether this call created the group (then `finish` destroys it; a group the caller
    made is theirs)."""
    if not ranks.active:
        return device, False
    import torch.distributed as dist

    if device.type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


def shard(items: Iterator[T], ranks: Ranks) -> Iterator[T]:
    """Every `size`-th item, starting at `rank`: disjoint shards that cover the sequence."""
    for index, item in enumerate(items):
        if index % ranks.size == ranks.rank:
            yield item


def gather(result: StreamResult, ranks: Ranks) -> StreamResult:
    """All ranks' statistics merged on rank 0 (other ranks get theirs back unchanged)."""
    if not ranks.active:
        return result
    import torch.distributed as dist

    parts: list[StreamResult | None] = [None] * ranks.size
    dist.all_gather_object(parts, result)
    if not ranks.is_main:
        return result
    merged: dict[str, tuple[SiteObservation, UnitStats]] = {}
    for part in parts:
        assert part is not None
        for site in part.sites:
            if site.name in merged:
                merged[site.name][1].merge(UnitStats.from_summary(site.stats))
            else:
                merged[site.name] = (site, UnitStats.from_summary(site.stats))
    sites = tuple(SiteObservation(o.name, o.op, o.axis, o.axis_source, stats.result(), o.extra)
                  for o, stats in merged.values())
    notes = tuple(dict.fromkeys(n for part in parts if part for n in part.notes))
    return StreamResult(sites, sum(p.samples for p in parts if p), any(p.partial for p in parts if p), notes,
                        result.engine)


def finish(owned: bool) -> None:
    """Leave the process group `start` created. Left to the interpreter's exit, gloo's
    threads sometimes ended a rank with "terminate called without an active exception"
    (exit -6) after the scan had finished."""
    if owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
