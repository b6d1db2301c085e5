"""Finding runs by names and paths that hold quotes, spaces and other scripts: MLflow's filter strings have no
escape, so every value is written the one way it can be, and matched exactly."""

import pytest
from mlflow.tracking import MlflowClient

from study.mlflow_runs import start_study_run
from tracking import store

NAMES = ["bob's study", 'say "hi"', "both ' and \"", "naïve ünïcode 研究", "plain", "100% _wild_"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quotes")
    uri = store.resolve_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    client = MlflowClient(uri)
    made = {}
    for name in NAMES:
        exp = store.ensure_experiment(client, name, uri)
        for storage in (f"/home/o'brien/{name}", f'/srv/"quoted"/{name}'):
            made[name, storage] = start_study_run(client, exp, name, {"storage": storage})
    return uri, client, made


@pytest.mark.parametrize("name", NAMES)
def test_a_study_is_found_by_its_name_and_storage_whatever_they_hold(studies, name):
    uri, client, made = studies
    for storage in (f"/home/o'brien/{name}", f'/srv/"quoted"/{name}'):
        run = store.find_study(uri, name, storage)
        assert run is not None and run.info.run_id == made[name, storage]
    assert store.find_study(uri, name, "/elsewhere") is None


def test_prefix_matching_never_returns_a_neighbour(studies):
    """A value with both quotes is searched by prefix and compared exactly: its neighbours stay out."""
    uri, client, made = studies
    exp = client.get_experiment_by_name("both ' and \"").experiment_id
    other = start_study_run(client, exp, "both ' and \"", {"storage": "/home/o'brien/both ' and \"x"})
    assert store.find_study(uri, "both ' and \"", "/home/o'brien/both ' and \"").info.run_id == \
        made["both ' and \"", "/home/o'brien/both ' and \""] != other


def test_literal_picks_the_quote_the_value_lacks():
    assert store.literal("plain") == "'plain'" and store.literal("bob's") == '"bob\'s"'
    assert store.literal('say "hi"') == "'say \"hi\"'" and store.literal("both ' \"") is None
