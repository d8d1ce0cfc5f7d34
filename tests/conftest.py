"""Shared fixtures: the dataset mirror, the `tiny` model and its tokenizer (loaded once).

Tests never reach the network: the Hub is put in offline mode before anything imports it, and the
dataset mirror comes from TAXON_DATA_DIR (or ../shared/data next to the repository, if present).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# This checkout's source for pytest (pyproject's `pythonpath`) and for every process a test starts
# (CLI subprocesses, Ray workers, torchrun), whatever an environment's editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT / "src"), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])

if not os.environ.get("TAXON_DATA_DIR"):
    _sibling = REPO_ROOT.parent / "shared" / "data"
    if _sibling.is_dir():
        os.environ["TAXON_DATA_DIR"] = str(_sibling)

# Offline before huggingface_hub / datasets read their settings at import time: a test that
# accidentally asks the Hub fails at once instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Under pytest-xdist (`make test` runs `-n auto`), each worker gets its share of the cores, so two
# workers do not oversubscribe two cores with two threads each. Set before torch is imported; the
# CLI subprocesses the tests start inherit it. A plain `pytest` run keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# Modules whose tests (or module fixtures) take minutes. Under xdist (`make test`: --dist
# loadscope, so a module's fixtures are built once, on one worker, and --no-loadscope-reorder)
# they are handed out first, so the long ones do not end up one after the other on one worker.
HEAVY_FIRST = ("test_seeds_cli.py", "test_study_resume.py", "test_architectures.py",
               "test_identity.py", "test_wsd_train.py", "test_study.py", "test_pipelines.py",
               "test_study_launcher.py", "test_study_tracking.py", "test_validation.py",
               "test_report.py")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a plain run keeps pytest's order

    def rank(item):
        name = item.path.name
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order inside a module is kept


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("TAXON_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.fail("no dataset mirror: set TAXON_DATA_DIR (<org>/<name>/<config>/<split>.jsonl)")
    return Path(value)


@pytest.fixture(scope="session")
def tiny_tokenizer(data_dir):
    from taxon.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_model(data_dir):
    """(model, tokenizer) of the random-initialised `tiny` alias, on CPU, in eval mode."""
    from taxon.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def fpb_card():
    from taxon.data.cards import get_card

    return get_card("fpb")


def read_jsonl(path: Path) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def fpb_rows(data_dir) -> dict[str, list[dict]]:
    """The raw mirror rows of every FPB config, read directly (not through taxon)."""
    root = data_dir / "takala" / "financial_phrasebank"
    configs = ("sentences_50agree", "sentences_66agree", "sentences_75agree", "sentences_allagree")
    return {c: read_jsonl(root / c / "train.jsonl") for c in configs}


FIXTURES_DATA = REPO_ROOT / "tests" / "fixtures" / "data"


@pytest.fixture(scope="session")
def merged_data_dir(data_dir, tmp_path_factory) -> Path:
    """The mirror and the hand-written fixtures (tests/fixtures/data, for datasets, configs and
    splits the mirror lacks) as one folder of symlinks. Nothing is written into the mirror; a
    fixture never shadows a mirror file."""
    root = tmp_path_factory.mktemp("merged-data")
    for source in (data_dir, FIXTURES_DATA):
        for path in sorted(source.rglob("*")):
            if path.suffix not in (".jsonl", ".parquet") or not path.is_file():
                continue
            link = root / path.relative_to(source)
            assert not link.exists(), f"fixture {path} would shadow mirror file {link}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return root
