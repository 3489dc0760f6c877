"""Examples in docs/ are run: every ```python block of each page, in order, in one namespace per page."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_doc_examples_run(page, capsys):
    if page.stem == "diffusers":
        pytest.importorskip("diffusers", reason="diffusers is not installed (pip install loopgraph[diffusers])")
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for code in blocks:
        # compiling for real is covered by tests/test_compile_loop.py; keep the docs run short
        code = re.sub(r"compile_loop\(setup\.wrapper(?=[,)])", "compile_loop(setup.wrapper, backend='eager'", code)
        code = re.sub(r"compile_pipeline\(setup\.pipe(?=[,)])", "compile_pipeline(setup.pipe, backend='eager'", code)
        exec(compile(code, str(page), "exec"), namespace)


def test_getting_started_first_loop_output():
    namespace: dict = {}
    code = re.findall(r"```python\n(.*?)```", (DOCS / "getting-started.md").read_text(), flags=re.S)[0]
    exec(code, namespace)
    assert namespace["x"].tolist() == [2.625, 2.625]
