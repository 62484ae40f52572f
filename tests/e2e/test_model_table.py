"""The e2e model table covers every file the workflows name, and says where to add a missing one
(runs on both hosts: no server needed)."""
import json

import pytest

from ae_testlib.pack import PACK_ROOT
from e2e import models

WORKFLOWS = {path.stem: json.loads(path.read_text()) for path in sorted((PACK_ROOT / "workflows").glob("*.json"))}


def test_every_file_a_workflow_names_has_a_builder():
    assert all(models.files_named(w) for w in WORKFLOWS.values())
    models.check_known(WORKFLOWS)


def test_an_unknown_model_file_fails_clearly():
    workflow = {"nodes": [{"type": "UNETLoader", "widgets_values": ["flux1-dev.safetensors", "default"]}]}
    with pytest.raises(LookupError, match=r"BUILDERS in tests/e2e/models.py\): flux: flux1-dev.safetensors"):
        models.check_known({"flux": workflow})


def test_every_checkpoint_workflow_runs_and_the_others_say_why_not():
    """Only a workflow whose text encoder cannot be had here is left unrun, and it says why."""
    for name, workflow in WORKFLOWS.items():
        checkpoint = any(n["type"] == "CheckpointLoaderSimple" for n in workflow["nodes"])
        why_not = models.not_runnable(workflow)
        assert not (checkpoint and why_not), f"{name} must run: {why_not}"
        assert why_not is None or "text encoder" in why_not
