"""Every name that crosses the wire between the ServerApp and the ClientApps.

Both sides import these constants; no record, metric or config key is spelled
anywhere else.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS", "METRICS", "PRIVACY", "CONFIG",
    "NUM_EXAMPLES", "TRAIN_LOSS", "EPSILON",
    "SITE", "DELTA", "ACCOUNTANT", "NOISE_MULTIPLIER", "SAMPLE_RATE", "STEPS",
    "SERVER_ROUND", "STATE_KEY", "NODE_SITE", "NODE_PARTITION_ID",
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

# Node state (context.state) and node config keys
STATE_KEY = "fedmm-site"
NODE_SITE = "site"  # deployment: the site's name in --node-config
NODE_PARTITION_ID = "partition-id"  # simulation: set by Flower
NODE_DATA = "data"  # deployment: the site's own data source, e.g. "manifest:/srv/site/manifest.csv"

# Train ConfigRecord: the model input the server built its model for (Schema.to_json)
SCHEMA = "schema"

# Reply ConfigRecord describing the model the site trained
MODEL = "model"
LAYOUT = "layout"  # fedmm.models.layout_fingerprint of the update's state_dict
