"""ResumableSampler: the data position is global, so a resume may change the number of processes."""
from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from training.pretrain.data import ResumableSampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_from_the_start_it_is_torchs_distributed_sampler(world):
    for rank in range(world):
        ours = ResumableSampler(41, num_replicas=world, rank=rank, seed=5)
        ref = DistributedSampler(range(41), num_replicas=world, rank=rank, seed=5, drop_last=True)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


def test_same_world_resume_continues_each_rank_where_it_stopped():
    """k regions per rank consumed by W ranks = the first k*W of the permutation."""
    for rank in range(2):
        full = ResumableSampler(40, num_replicas=2, rank=rank, seed=1)
        full.set_epoch(2)
        resumed = ResumableSampler(40, num_replicas=2, rank=rank, seed=1)
        resumed.set_epoch(2)
        resumed.set_start(6 * 2)  # 6 regions per rank consumed
        assert list(resumed) == list(full)[6:]


@pytest.mark.parametrize("old,new", [(1, 2), (2, 1), (2, 3)])
def test_changed_world_sees_the_rest_of_the_epoch_once(old, new):
    """Resumed with another process count: what the old ranks had not seen, dealt to the new ranks,
    no region twice and none of the consumed ones again (up to fewer than one region per rank)."""
    n, per_rank_done = 40, 6
    seen = []
    for rank in range(old):
        s = ResumableSampler(n, num_replicas=old, rank=rank, seed=9)
        s.set_epoch(1)
        seen += list(s)[:per_rank_done]
    rest = []
    for rank in range(new):
        s = ResumableSampler(n, num_replicas=new, rank=rank, seed=9)
        s.set_epoch(1)
        s.set_start(len(seen))
        part = list(s)
        assert len(part) == len(s) == (n - len(seen)) // new
        rest += part
    assert len(set(seen + rest)) == len(seen) + len(rest)  # nothing twice
    assert n - len(seen) - len(rest) < new  # only the remainder that does not fill every rank is left
