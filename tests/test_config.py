import pytest

from shardlight.core.config import load_config, parse_config
from shardlight.core.errors import InputError


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clip:\n  modle: ViT-B-32\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert "unknown key 'clip.modle'" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_value_is_one_line():
    with pytest.raises(InputError, match=r"compute.batch_size: Input should be greater than or equal to 1"):
        parse_config({"compute": {"batch_size": 0}})


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(bad)


def test_relative_weight_paths_resolve_beside_the_config(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.safetensors").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text("clip:\n  pretrained: models/w.safetensors\nlabels:\n  checkpoint: elsewhere.pt\n")
    cfg = load_config(path, input="data", output=None)
    assert cfg.clip.pretrained == str(tmp_path / "models" / "w.safetensors")
    assert cfg.labels.checkpoint == "elsewhere.pt"  # not beside the config: left as given
    assert cfg.input == "data" and cfg.output is None


def test_demo_config_is_valid():
    from flows.cli import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    assert cfg.clip.model == "shapes-clip" and cfg.labels.kind == "vit"


def test_the_readme_lists_every_config_key_with_its_default():
    """README's "Every key, with its default" block is the schema: nothing missing, nothing stale."""
    import re

    import yaml

    from shardlight.core.config import REPO_ROOT, RunConfig

    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"Every key, with its default:\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    listed = yaml.safe_load(block)
    defaults = RunConfig().model_dump()
    assert listed.keys() == defaults.keys()
    for section, values in defaults.items():
        if isinstance(values, dict):
            assert listed[section] is None or sorted(listed[section]) == sorted(values), section
