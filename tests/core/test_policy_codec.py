"""The rules' serialised form: the names AR_STATE files hold, one codec, one registry per concern.

Each rule class owns its ``to_dict`` / ``from_dict`` and is registered by its serialised name
(``RULE_FAMILIES`` by ``family``, ``MIDDLE_KINDS`` by ``kind``); the AR_STATE schema
(:mod:`headforcing_core.validation`), the trackers (:mod:`headforcing_core.retention`) and the
device tiers (:mod:`headforcing_core.cache`) are keyed by the same names.
"""

import dataclasses
import json

from headforcing_core import cache, retention, validation
from headforcing_core.policies import (MIDDLE_KINDS, RULE_FAMILIES, make_policy, policy_from_dict, policy_to_dict,
                                       rule_from_dict)

# the rules of two presets as AR_STATE files have held them (written before the rules owned their codec)
SAVED_RULES = {
    "pyramid_forcing": [
        ["anchor", {"family": "pyramid", "sink_frames": 3, "recent_frames": 4,
                    "middle": {"kind": "Stride", "interval": 6, "capacity": 4}, "stable_stride": True}],
        ["wave", {"family": "pyramid", "sink_frames": 1, "recent_frames": 4,
                  "middle": {"kind": "Cyclic", "period": 6, "bucket_capacity": 4}, "stable_stride": False}],
        ["veil", {"family": "pyramid", "sink_frames": 3, "recent_frames": 4,
                  "middle": {"kind": "Merge", "patch": 2, "capacity": 4}, "stable_stride": False}]],
    "head_forcing": [
        ["local", {"family": "retention", "sink": 0, "recent": 2, "middle": None, "window": False}],
        ["anchor", {"family": "retention", "sink": 3, "recent": 2, "middle": None, "window": False}],
        ["memory", {"family": "retention", "sink": 3, "recent": 6,
                    "middle": {"kind": "Episodic", "cap": 8, "pool": 2, "similarity": 0.9}, "window": False}]],
}


def test_saved_rules_read_and_write_back_unchanged():
    for preset, rules in SAVED_RULES.items():
        pol = make_policy(preset)
        assert json.loads(json.dumps(policy_to_dict(pol)))["rules"] == rules
        assert tuple((t, rule_from_dict(r)) for t, r in rules) == pol.rules
        assert policy_from_dict(policy_to_dict(pol)) == pol
    # a rule without a family is ours (the oldest files)
    assert rule_from_dict({"sink": 1, "recent": 4}) == make_policy("sink_window", sink=1, recent=4).rules[0][1]


def test_every_registered_name_is_known_to_the_schema_the_trackers_and_the_cache():
    assert set(RULE_FAMILIES) == set(validation._RULE_FIELDS) == set(retention.TRACKERS) == {"retention", "pyramid"}
    assert set(MIDDLE_KINDS) == set(validation._MIDDLE_FIELDS) == {"Episodic", "Stride", "Cyclic", "Merge"}
    for family, cls in RULE_FAMILIES.items():
        assert cls.family == family
        assert set(validation._RULE_FIELDS[family]) == {f.name for f in dataclasses.fields(cls)}
        assert validation._RULE_FIELDS[family]["middle"] == cls.middles
    for kind, cls in MIDDLE_KINDS.items():
        assert cls.kind == kind
        assert set(validation._MIDDLE_FIELDS[kind]) == {f.name for f in dataclasses.fields(cls)}
    pyramid_middles = set(RULE_FAMILIES["pyramid"].middles)
    assert set(retention.PYRAMID_MIDDLES) == pyramid_middles
    # Stride / Cyclic keep whole frames in the frame pool; the others have a device tier of their own
    assert set(cache.MIDDLE_TIERS) == set(MIDDLE_KINDS) - {"Stride", "Cyclic"}
