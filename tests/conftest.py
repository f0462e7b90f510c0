"""Shared test set-up: quiet, deterministic CPU runs; the tiny in-process model; the release-parity fixture.

Every test runs on a fresh clone: models are built in-process (:mod:`codsr.testing`) and the few
small data files live in ``tests/fixtures/``. The one exception is the release-parity fixture
(``official_parity``, ~56 MB, made by the authors' code, kept out of git): tests using
``parity_dir``/``parity_pipeline``/``parity_case`` skip where it is absent, naming it. Likewise the
RAM tagger's parity fixture (``ram``, ``ram_fixture_dir``).

A test may skip only for a reason outside the project; the reason then starts with one of
:data:`ALLOWED_SKIP_PREFIXES` (use :func:`skip_reason`). ``pytest --strict-skips`` (``.ci/run``)
fails the run on any other skip.
"""

from __future__ import annotations

import os

# Must be set before torch is imported: the default OpenMP spin policy makes the 2-core CI
# machine 2-3x slower and erratic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402

# Weights are looked up by flag → CODSR_* variable → CODSR_HOME (codsr.weights): tests must not pick
# up a developer's real DAPE/RAM/checkpoint (a 5.6 GB tagger would load into every pipeline test).
for _var in ("CODSR_DAPE", "CODSR_RAM", "CODSR_CHECKPOINT", "CODSR_BASE_MODEL", "CODSR_DINO", "CODSR_LPIPS_VGG",
             "CODSR_GROUNDING_DINO", "CODSR_SAM"):
    os.environ.pop(_var, None)
os.environ["CODSR_HOME"] = tempfile.mkdtemp(prefix="codsr-home-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# ------------------------------------------------------------------------------ skips
NO_GPU = "no GPU:"
OPTIONAL_EXTRA = "optional extra not installed:"
PARITY_ABSENT = "release-parity fixture absent:"
ALLOWED_SKIP_PREFIXES = (NO_GPU, OPTIONAL_EXTRA, PARITY_ABSENT)


def skip_reason(prefix: str, detail: str) -> str:
    """A skip reason ``.ci/run`` accepts: ``prefix`` is one of :data:`ALLOWED_SKIP_PREFIXES`."""
    if prefix not in ALLOWED_SKIP_PREFIXES:
        raise ValueError(f"skip prefix {prefix!r} is not an allowed external reason {ALLOWED_SKIP_PREFIXES}")
    return f"{prefix} {detail}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-skips",
        action="store_true",
        help="fail the run when a test skips for a reason other than " + ", ".join(ALLOWED_SKIP_PREFIXES),
    )


def _skip_message(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


_BAD_SKIPS: list[str] = []


def _check_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        msg = _skip_message(report)
        if not msg.startswith(ALLOWED_SKIP_PREFIXES):
            _BAD_SKIPS.append(f"{report.nodeid}: {msg}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _check_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _check_skip(report)  # a whole module skipped at import (pytest.importorskip, pytest.skip(allow_module_level))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _BAD_SKIPS:
        strict = " (--strict-skips: the run fails)" if config.getoption("--strict-skips") else ""
        terminalreporter.section("skips for reasons inside the project" + strict)
        for line in _BAD_SKIPS:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _BAD_SKIPS and session.config.getoption("--strict-skips") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="session")
def tiny_pipeline():
    """In-process tiny CODSRPipeline: tiny SD 2.1 + synthetic stage-2 release checkpoint (seed 0, fp32, CPU)."""
    import torch

    from codsr.testing import tiny_pipeline as build

    return build(seed=0, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The same tiny model as files, written once: ``tiny-sd21/`` and ``codsr_tiny.pkl`` (the parity layout)."""
    from codsr.testing import save_tiny_release

    root = tmp_path_factory.mktemp("tiny_model")
    save_tiny_release(root, seed=0)
    return root


# ------------------------------------------------------------------------------ release parity
# Made with the authors' release code, kept out of git; CI has them in ../shared/fixtures.
RELEASE_FIXTURES = REPO.parent / "shared" / "fixtures"
PARITY_ENV = "CODSR_PARITY_FIXTURE"
RAM_FIXTURE_ENV = "CODSR_RAM_FIXTURE"


def parity_fixture_path() -> Path:
    return Path(os.environ.get(PARITY_ENV) or RELEASE_FIXTURES / "official_parity")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The release-parity fixture: tiny SD-2.1 model, release-format checkpoint, tensors of the authors' code."""
    path = parity_fixture_path()
    if not (path / "codsr_tiny.pkl").is_file():
        pytest.skip(
            skip_reason(
                PARITY_ABSENT,
                f"'official_parity' not found at {path}. It holds outputs of the authors' release code "
                "(Chanson94/CODSR @68cad3c, CODSR_test.forward) on a tiny model, ~56 MB, kept out of git; "
                f"CI has it at ../shared/fixtures/official_parity. Set {PARITY_ENV}=<folder> to run these "
                "tests (regenerating it needs the authors' code; see the README, section Tests).",
            )
        )
    return path


@pytest.fixture(scope="session")
def parity_pipeline(parity_dir):
    """CODSRPipeline on the parity fixture's tiny model and release checkpoint (fp32, CPU)."""
    import torch

    from codsr import CODSRPipeline

    return CODSRPipeline.from_pretrained(
        parity_dir / "tiny-sd21", parity_dir / "codsr_tiny.pkl", device="cpu", torch_dtype=torch.float32
    )


@pytest.fixture(scope="session")
def parity_case(parity_dir):
    """Loader for the fixture's npz cases (``"untiled"``, ``"tiled"``) as dicts of torch tensors / str."""
    import numpy as np
    import torch

    cache: dict = {}

    def load(name: str) -> dict:
        if name not in cache:
            z = np.load(parity_dir / f"case_{name}.npz", allow_pickle=False)
            cache[name] = {k: (str(z[k]) if z[k].dtype.kind == "U" else torch.from_numpy(z[k])) for k in z.files}
        return cache[name]

    return load


@pytest.fixture(scope="session")
def ram_fixture_dir() -> Path:
    """The release-parity RAM fixture: logits of the authors' RAM/DAPE tagger on the codsr.testing.ram rule weights."""
    path = Path(os.environ.get(RAM_FIXTURE_ENV) or RELEASE_FIXTURES / "ram")
    if not (path / "reference.npz").is_file():
        pytest.skip(
            skip_reason(
                PARITY_ABSENT,
                f"'ram' fixture (reference.npz, 4.3 MB: logits of the authors' RAM/DAPE tagger, Chanson94/CODSR "
                f"@68cad3c, on the codsr.testing.ram rule weights) not found at {path}; kept out of git, CI has "
                f"it at ../shared/fixtures/ram. Set {RAM_FIXTURE_ENV}=<folder> to run these tests.",
            )
        )
    return path
