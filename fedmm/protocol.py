"""Every name that crosses the wire between the ServerApp and the ClientApps.

Both sides import these constants; no record, metric or config key is spelled
anywhere else.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS", "METRICS", "PRIVACY", "CONFIG",
    "NUM_EXAMPLES", "TRAIN_LOSS", "EPSILON",
    "SITE", "DELTA", "ACCOUNTANT", "NOISE_MULTIPLIER", "SAMPLE_RATE", "STEPS",
    "SERVER_ROUND", "ENROLLED", "STATE_KEY", "NODE_SITE", "NODE_PARTITION_ID", "NODE_KEY", "NODE_LENIENT", "PROOF",
]

# RecordDict keys of a train message and its reply
ARRAYS = "arrays"  # ArrayRecord: model weights (global in, local out)
METRICS = "metrics"  # MetricRecord: numbers the strategy aggregates
PRIVACY = "privacy"  # ConfigRecord: the site's privacy report (not averaged)
CONFIG = "config"  # ConfigRecord: per-round instructions from the server

# MetricRecord keys (identical for every site, as FedAvg requires)
NUM_EXAMPLES = "num-examples"  # FedAvg weights by this
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # the site's cumulative epsilon; aggregated as a maximum

# Privacy ConfigRecord keys
SITE = "site"
DELTA = "delta"
ACCOUNTANT = "accountant"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"

# Train ConfigRecord keys
SERVER_ROUND = "server-round"
RUN_ID = "run-id"  # the server's run id: labels the sites' ledger entries
# deployment: the site name whose enrolled key this node registered with (the SuperLink's records); a site
# whose own name differs refuses before it trains (another site's key: its update would be rejected after the spend)
ENROLLED = "enrolled-site"

# Reply ConfigRecord of a site that refuses the round (its budget or policy); no weights
REFUSED = "refused"
REASON = "reason"
# Privacy ConfigRecord: the site's budget and its ledger head after this round
BUDGET = "epsilon-budget"
LEDGER_SEQ = "ledger-seq"
LEDGER_HASH = "ledger-hash"

# Node state (context.state) and node config keys
STATE_KEY = "fedmm-site"
NODE_SITE = "site"  # deployment: the site's name in --node-config
NODE_PARTITION_ID = "partition-id"  # simulation: set by Flower
NODE_DATA = "data"  # deployment: the site's own data source, e.g. "manifest:/srv/site/manifest.csv"
# deployment: the site's own privacy policy (fedmm.privacy.policy), never the server's to set
NODE_STATE_DIR = "state-dir"
NODE_EPSILON_BUDGET = "epsilon-budget"
NODE_DELTA = "delta"
NODE_MIN_NOISE = "min-noise-multiplier"
NODE_REQUIRE_DP = "require-dp"
NODE_MIN_BATCH = "min-batch-size"  # the smallest batch-size the site takes: its sample rate tells its record count to within a batch
NODE_KEY = "key"  # deployment: the site's SuperNode key, which signs its claim to its name (fedmm.secure.identity)
NODE_LENIENT = "lenient"  # deployment: skip (and count) bad rows of the site's own data; the run config's lenient is not taken

# Train ConfigRecord: the model input the server built its model for (Schema.to_json)
SCHEMA = "schema"

# Secure aggregation (legacy FitIns config / FitRes metrics, fedmm.federation.secagg)
TENSOR_NAMES = "tensor-names"  # JSON list: the names of the global model's tensors, in the order sent
CLIPPED_VALUES = "clipped-values"  # never sent: a site's count of values clipped to SecAgg+'s range stays in its log

# Reply ConfigRecord describing the model the site trained
MODEL = "model"
LAYOUT = "layout"  # fedmm.models.layout_fingerprint of the update's state_dict
PROOF = "site-proof"  # a deployed site's signature over (run, round, node, its name) with its enrolled key
