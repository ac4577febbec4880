"""params.yaml is written in the style `dvc exp run -S` writes it (DVC's YAML round trip: empty for null, single
quotes), so an applied experiment changes exactly the lines of its keys, not 30 lines of style."""

from __future__ import annotations

import difflib
import shutil

from dvc.utils.serialize import modify_yaml

from tests.helpers.paths import REPO


def test_dvcs_round_trip_leaves_params_yaml_as_it_is(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    with modify_yaml(params):  # what `dvc exp run -S` does around its change
        pass
    assert params.read_text() == (REPO / "params.yaml").read_text()


def test_an_applied_experiment_diffs_only_its_key(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    with modify_yaml(params) as data:
        data["train"]["steps"] = 600
    before, after = (REPO / "params.yaml").read_text().splitlines(), params.read_text().splitlines()
    changed = [line for line in difflib.unified_diff(before, after, n=0, lineterm="") if line[:1] in "+-"][2:]
    assert len(changed) == 2 and changed[0].startswith("-  steps: auto") and changed[1].startswith("+  steps: 600")
