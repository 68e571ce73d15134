import argparse
import re
from pathlib import Path

import pytest

from amusd_mq import config as c

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_env_and_flags_in_order_of_precedence():
    assert c.load(env={}).lookahead == 8
    assert c.load(env={"AMUSD_LOOKAHEAD": "3"}).lookahead == 3
    parser = argparse.ArgumentParser()
    c.add_flags(parser)
    args = parser.parse_args(["--lookahead", "5", "--draft-wrong", "true"])
    cfg = c.load(args, env={"AMUSD_LOOKAHEAD": "3"})
    assert cfg.lookahead == 5 and cfg.draft_wrong is True


@pytest.mark.parametrize("env", [{"AMUSD_LOOKAHEAD": "0"}, {"AMUSD_LOOKAHEAD": "many"}, {"AMUSD_DRAFT_WRONG": "maybe"},
                                 {"AMUSD_HEARTBEAT_S": "-1"}, {"AMUSD_MAX_MESSAGE_BYTES": "10"}])
def test_bad_values_are_clear_errors(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        c.load(env=env)


def test_each_role_gets_only_its_flags():
    parser = argparse.ArgumentParser()
    c.add_flags(parser, c.DRAFT)
    flags = {a.dest for a in parser._actions}
    assert "draft_model" in flags and "verify_model" not in flags and "coordinator_url" in flags


def test_settings_and_config_agree():
    assert [s.name for s in c.SETTINGS] == [f for f in c.Config.__dataclass_fields__]


def test_env_example_lists_every_setting():
    listed = set(re.findall(r"^(AMUSD_\w+)=", (ROOT / ".env.example").read_text(), re.M))
    assert listed == {s.env for s in c.SETTINGS}


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [s.env for s in c.SETTINGS if f"`{s.env}`" not in readme]
    assert not missing
