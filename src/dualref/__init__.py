"""dualref: unsupervised domain adaptive person re-identification (Dual-Refinement).

The package root stays light so that `dualref --help` starts at once; the public API lives in its modules:
`dualref.data.load_dataset`, `dualref.evaluation.rank_metrics`, `dualref.distances.jaccard_distance`,
`dualref.clustering.cluster_dbscan`, `dualref.losses.spread_out_loss`, `dualref.inference.load_model`,
and the pipelines in `dualref.pipelines` (pretrain, adapt, cluster, demo, study).
"""

__version__ = "0.1.0"
