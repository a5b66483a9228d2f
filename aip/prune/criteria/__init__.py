"""The channel criteria, one module each, filed by config name in `registry.IMPORTANCES` as they are imported.

Each entry is a factory taking the `prune` config and returning a `tp.importance.Importance`: called on a dependency
group, it gives one score per channel of the group's root (higher = keep). Scores are normalised per group (mean 1)
so that a global ranking across groups compares like with like.

To add a criterion: write a module here whose factory is decorated `@register_importance("name")` (from
`aip.prune.criteria.registry`), and import it below. An Importance whose calibration passes must run backward sets
`needs_gradients = True`; one that records something on calibration batches sets `needs_features = True` and gives
`recording(model)`, a context manager the caller runs its calibration batches in; one that removes every channel
under a fixed score instead of the schedule's share sets `prune_threshold` (see `aip.prune.importance`).
"""

from aip.prune.criteria import activation, bn_scale, fpgm, magnitude, similarity, taylor  # noqa: F401  (registers them)
