"""Named jobs for what `mcx materialize` runs (mcx_dagster.orchestration builds the same names), so CLI
runs show under a job in the UI instead of `__ephemeral_asset_job__`:

- `mcx_pipeline`: the asset graph but the partitioned sweep and the post-hoc analyses (one run per
  training cycle from the CLI);
- `mcx_post_hoc`: the telemetry analyses (they must run even when an acceptance check failed);
- `mcx_demo_sweep`: the demo's one small sweep cell (the nightly schedule runs `nightly_eval_sweep_job`).
"""

import dagster as dg

from mcx_dagster.defs.sweep import SWEEP_ASSET
from mcx_dagster.orchestration import POST_HOC

mcx_pipeline = dg.define_asset_job(
    "mcx_pipeline", selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*POST_HOC, SWEEP_ASSET),
    description="Everything `mcx materialize` runs first (the training cycles, evaluations and the gate).",
)
mcx_post_hoc = dg.define_asset_job(
    "mcx_post_hoc", selection=dg.AssetSelection.assets(*POST_HOC),
    description="The post-hoc telemetry analyses and alerts (`mcx materialize`'s second pass).",
)
