"""The AR_STATE file format's identity: one place for its name, version and metadata key."""

STATE_FORMAT = "headforcing.ar_state"
# 2: per-type stores (the head-wise cache of the plan/run redesign); 3: one K/V arena, keys stored rotated at
# their own time, pools without the chunk's headroom where attention does not read them in place
STATE_VERSION = 3
STATE_META_KEY = "headforcing_state"
STATE_SUFFIX = ".safetensors"
