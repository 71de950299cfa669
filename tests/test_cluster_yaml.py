"""cluster.yaml passes Ray's own launcher validation; no secret in cluster.yaml or sweeps/."""
import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_accepts_cluster_yaml():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(load())  # Ray's default-filling (merges the provider's defaults.yaml)
    validate_config(cfg)          # Ray's JSON schema (ray/autoscaler/ray-schema.json) + checks
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and types["head"]["resources"]["GPU"] == 0
    assert types["gpu_1x_spot"]["resources"] == {"GPU": 1}
    assert types["gpu_1x_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_8x"]["resources"] == {"GPU": 8}
    assert "pip install -q -e /home/ray/tn_ray" in cfg["setup_commands"]


def test_ray_rejects_a_broken_copy():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(load())
    bad["available_node_types"]["gpu_1x_spot"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        validate_config(prepare_config(bad))


SECRET = re.compile(
    r"(AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----|"
    r"(api[_-]?key|token|password|secret|aws_secret_access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+_-]{8,})",
    re.IGNORECASE)


def test_no_credential_literal_in_cluster_yaml_or_sweeps():
    files = [REPO / "cluster.yaml", *sorted((REPO / "sweeps").rglob("*"))]
    files = [f for f in files if f.is_file()]
    assert len(files) >= 2
    hits = [(f.name, m.group(0)) for f in files for m in SECRET.finditer(f.read_text(errors="replace"))]
    assert not hits, hits
    assert SECRET.search("api_key: sk-abcdefghijklmnopqrstuv")  # the pattern does catch one
