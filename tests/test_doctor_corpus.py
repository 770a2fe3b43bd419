"""The doctor on the corpus: scripts written from public bug reports, each with a known answer in its docstring.

Each script in tests/corpus/ says `Report: <URL>` (the public report it follows) and `Known answer: <causes>`
(or `none`), and `Warnings: <names>` where it has any. The doctor must name exactly those causes and
warnings. The scripts cover both import orders, custom loops with no `fit`, clean scripts and scripts whose
pattern looks suspicious while memory stays flat.
"""

import importlib.util
import pathlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from safetrain import diagnostics, doctor

CORPUS = pathlib.Path(__file__).parent / "corpus"
# The docstring parser lives with the benchmark that reports the same verdicts (benchmarks/doctor.py).
_spec = importlib.util.spec_from_file_location("doctor_benchmark", CORPUS.parent.parent / "benchmarks" / "doctor.py")
assert _spec is not None and _spec.loader is not None
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)
known_answer = _benchmark.known_answer

SCRIPTS = sorted(p.name for p in CORPUS.glob("*.py"))


def test_the_corpus_is_at_least_20_scripts_each_with_a_report_and_a_known_answer():
    assert len(SCRIPTS) >= 20
    for name in SCRIPTS:
        answer = known_answer(CORPUS / name)
        assert answer["report"].startswith("https://"), name
        assert answer["causes"] is not None, name
        assert answer["causes"] <= set(diagnostics.CAUSES), name
        assert answer["warnings"] <= set(diagnostics.WARNINGS), name


def test_the_corpus_covers_both_import_orders_custom_loops_and_clean_scripts():
    sources = {name: (CORPUS / name).read_text() for name in SCRIPTS}

    def first_import(src):
        return next(line for line in src.splitlines() if line.startswith(("import ", "from ")))

    assert any(first_import(s).startswith(("import tensorflow", "from tensorflow")) for s in sources.values())
    assert any(first_import(s).startswith("import keras") for s in sources.values())
    no_fit = [n for n, s in sources.items() if ".fit(" not in s]
    assert len(no_fit) >= 4
    clean = [n for n in SCRIPTS if not known_answer(CORPUS / n)["causes"]]
    assert len(clean) >= 6


@pytest.fixture(scope="module")
def reports():
    """Every corpus script under the doctor, two at a time (each in its own child process)."""

    def one(name):
        return name, doctor.run(str(CORPUS / name), echo=False, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, SCRIPTS))


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_doctor_diagnoses_the_corpus_exactly(reports, name):
    report, answer = reports[name], known_answer(CORPUS / name)
    assert report["exit_code"] == 0, report["text"]
    diagnosis = report["diagnosis"]
    found = {c["cause"] for c in diagnosis["causes"]}
    warned = {w["cause"] for w in diagnosis["warnings"]} - {"retraced"}  # informational, never a known answer
    assert (found, warned) == (answer["causes"], answer["warnings"]), report["text"]
    assert diagnosis["leak"] == bool(answer["causes"])
    for cause in diagnosis["causes"]:
        assert cause["evidence"] and cause["fix"]
        assert cause["growth_mb"] > 0  # every cause accounts for memory that grew
    # Whatever the script imported first, Keras was instrumented: its models were counted.
    assert diagnosis["counts"]["models"] >= 1, report["text"]


@pytest.mark.parametrize("name", [n for n in SCRIPTS if known_answer(CORPUS / n)["causes"]])
def test_each_cause_names_a_line_the_corpus_expects(reports, name):
    expected = known_answer(CORPUS / name)["lines"]
    assert expected, f"{name}: the docstring states no `Expected lines:`"
    report = reports[name]
    for cause in report["diagnosis"]["causes"]:
        named = {site["line"] for site in cause.get("lines", ()) if site["file"].endswith(name)}
        assert named & expected, f"{cause['cause']} names lines {sorted(named)}, expected one of {sorted(expected)}"
        assert all(site["source"] for site in cause["lines"])  # quoted from the script
