"""One-process launcher run whose CSV loader draws the same sample order as a torchrun run.

open_clip shuffles with DistributedSampler(seed 0) under torch.distributed and with a
RandomSampler otherwise. For the 1-vs-2-process test the single process uses a
DistributedSampler with one replica, so global batch k holds the same samples in both runs.
Test-only: the product never patches open_clip's data loading.
"""
import sys

import open_clip_train.data as ocd
from torch.utils.data import DistributedSampler

from openclip_structure.main import main

_DataLoader = ocd.DataLoader


def DataLoader(dataset, *args, shuffle=False, sampler=None, **kwargs):
    if shuffle and sampler is None:
        sampler, shuffle = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0), False
    return _DataLoader(dataset, *args, shuffle=shuffle, sampler=sampler, **kwargs)


ocd.DataLoader = DataLoader

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
