"""Examples in docs/ are run: every ```python block of each page, in order, in one namespace per page."""

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())
EXAMPLES = DOCS / "examples"
QUICK_START = "Quick start: compile your own loop"  # getting-started.md's section; its loop is examples/my_loop.py
# compiling for real is covered by tests/test_compile_loop.py; the docs run with backend="eager" to stay short
_EAGER_BACKEND = re.compile(
    r"(compile_loop\((?:setup\.wrapper|wrapper)|compile_pipeline\((?:setup\.pipe|pipe))(?=[,)])")


def page_blocks(page: Path, section: str | None = None) -> list[str]:
    """A page's ```python blocks (those of its ``## section`` only, when given), in order, each compile_loop /
    compile_pipeline call given backend='eager'."""
    text = page.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [_EAGER_BACKEND.sub(r"\1, backend='eager'", code) for code in blocks]


def run_page(page: Path, section: str | None = None, printed: list[str] | None = None) -> dict:
    """Runs the page's blocks in one namespace; ``printed`` gets what each block printed."""
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for code in page_blocks(page, section):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(page), "exec"), namespace)
        if printed is not None:
            printed.append(out.getvalue())
    return namespace


def documented_outputs(page: Path) -> dict[int, str]:
    """Index of a ```python block -> the ```text block right after it: what the page says it prints."""
    found, index = {}, -1
    for match in re.finditer(r"```(python|text)\n(.*?)```", page.read_text(), flags=re.S):
        kind, body = match.groups()
        if kind == "python":
            index, end = index + 1, match.end()
        elif index >= 0 and not match.string[end:match.start()].strip():
            found[index] = body
    return found


def as_shown(text: str) -> str:
    """Printed text as the docs show it: paths from the repository root, seconds (which vary) as "…"."""
    text = text.replace(str(DOCS.parent) + "/", "")
    text = re.sub(r"_s=\d+(\.\d+)?", "_s=…", text)
    return re.sub(r"\(\d+ ms\)", "(… ms)", text).strip()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_doc_examples_run_and_print_what_the_page_shows(page):
    if page.stem == "diffusers":
        pytest.importorskip("diffusers", reason="diffusers is not installed (pip install loopgraph[diffusers])")
    printed: list[str] = []
    run_page(page, printed=printed)
    for k, shown in documented_outputs(page).items():
        assert as_shown(printed[k]) == as_shown(shown), f"{page.name}: python block {k} prints other text"


def test_getting_started_first_loop_output():
    namespace: dict = {}
    code = re.findall(r"```python\n(.*?)```", (DOCS / "getting-started.md").read_text(), flags=re.S)[0]
    exec(code, namespace)
    assert namespace["x"].tolist() == [2.625, 2.625]


def test_the_quick_start_shows_docs_examples_my_loop_as_it_is():
    assert (EXAMPLES / "my_loop.py").read_text() in page_blocks(DOCS / "getting-started.md", QUICK_START)


def test_the_quick_starts_compiled_loop_and_pipeline_equal_eager():
    namespace = run_page(DOCS / "getting-started.md", QUICK_START)
    fast, expected = namespace["fast"], namespace["expected"].latents
    assert fast.config.backend == "eager"  # the rewrite reached the quick start's compile_loop
    assert fast.stats.calls == 2 and fast.stats.compiled_calls == 1 and fast.stats.plans == 1
    assert fast.last_plan.kind == "whole loop on state buffers"
    torch.testing.assert_close(namespace["state"].latents, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(namespace["latents"], expected, rtol=0, atol=1e-6)  # the compiled pipeline's
    assert "<root>: DenoiseLoop -> whole loop on state buffers" in namespace["loopgraph"].explain(namespace["pipe"])


def test_docs_examples_my_loop_loads_as_the_benchs_loop(monkeypatch):
    from loopgraph.bench.loop import user_loop

    monkeypatch.syspath_prepend(str(EXAMPLES))  # `cd docs/examples && loopgraph bench --loop my_loop:setup`
    monkeypatch.delitem(sys.modules, "my_loop", raising=False)
    try:
        loop = user_loop("my_loop:setup", steps=4)
        assert loop.output == "latents" and isinstance(loop.components.denoiser, torch.nn.Module)  # compile_denoiser
        state = loop.new_state()
        assert state.sigmas.shape == (5,)  # make_state(steps): 4 steps
        _, state = loop.wrapper(loop.components, state)
        assert state.latents.shape == (2, 16) and torch.isfinite(state.latents).all()
    finally:
        sys.modules.pop("my_loop", None)
