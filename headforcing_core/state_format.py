"""The AR_STATE file format's identity: one place for its name, version and metadata key."""

STATE_FORMAT = "headforcing.ar_state"
STATE_VERSION = 2  # 2: per-type stores (the head-wise cache of the plan/run redesign)
STATE_META_KEY = "headforcing_state"
STATE_SUFFIX = ".safetensors"
