"""Data sets, records, transforms, samplers and loaders.

``from dualref.data import load_dataset`` gives the splits of Market-1501, DukeMTMC-reID, MSMT17, a labelled
``folder`` or an ``unlabelled`` folder as `ReidSplits` of `Sample(path, pid, camid)` records.
"""

from dualref.data.datasets import load_dataset
from dualref.data.records import ReidSplits, Sample, relabel_pids

__all__ = ["ReidSplits", "Sample", "load_dataset", "relabel_pids"]
