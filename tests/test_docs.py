"""The docs describe the code that exists."""
import re
from dataclasses import fields
from pathlib import Path

from amusd_mq.wire import protocol as p

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = blocks[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_protocol_doc_names_every_message_and_field():
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for name, cls in p.MESSAGES.items():
        assert f"`{name}`" in doc, name
        for f in fields(cls):
            assert f"`{f.name}" in doc, f"{name}.{f.name}"


def test_procfile_starts_the_services_and_the_gateway():
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    assert procfile == {r: f"python -m services.{r}" for r in ("coordinator", "verify", "draft", "gateway")}
