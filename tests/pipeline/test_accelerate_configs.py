"""recipes/accelerate/: each launch config loads with accelerate's own config class and says when to use it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes/accelerate").glob("*.yaml"))
EXPECTED = {
    "single.yaml": "NO",
    "ddp.yaml": "MULTI_GPU",
    "fsdp2.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
}


def test_all_five_configs_ship():
    assert {p.name for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_has_a_header(path):
    from accelerate.commands.config.config_args import ClusterConfig

    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert len(header) >= 2 and "accelerate launch --config_file" in text  # when to use it, and how
    config = ClusterConfig.from_yaml_file(str(path))
    assert str(config.distributed_type).split(".")[-1] == EXPECTED[path.name]
    if path.name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
    if path.name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
