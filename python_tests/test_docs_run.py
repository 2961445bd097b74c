"""Docs that run: every ```python block of README.md and docs/*.md is executed here, on CPU.

Convention (also in docs/integrations.md, "Docs that run"):

* The blocks of one file run in file order in one namespace, like a notebook: a block sees the
  names earlier blocks of the same file defined.  Each file starts from a fresh namespace
  holding the fixtures of ``python_tests/doc_fixtures.py`` (``FIXTURES`` lists them: ``torch``,
  ``student``/``model``, ``teacher``, ``tokenizer``, ``input_ids``, ``attention_mask``,
  ``labels``, ``dataset``, ``chat_dataset``, ``tmp_dir``), tiny models built from configs, so a
  snippet can be written as a user would (``model(input_ids)``) and still run.  The working
  directory is a fresh temporary one, so ``output_dir="out"`` is harmless.
* Directives are HTML comments on the lines right before the fence (invisible when rendered):
  - ``<!-- doc-test: setup`` ... ``-->``: the lines in between are Python run just before the
    block, in the same namespace (a hidden prelude for names the reader should not see).
  - ``<!-- doc-test: skip REASON -->``: the block is not run; REASON is mandatory and says why
    it cannot run here (a signature listing, a multi-GPU launch, a 7B download).  Use it rarely:
    command lines belong in ```bash blocks, output in ```text blocks.
* Blocks must finish in seconds on CPU: tiny tensors, tiny models, a step or two.
"""

import glob
import os
import re
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(\w+)(.*)$", re.S)


class Block:
    def __init__(self, path, line, code, setup=None, skip=None):
        self.path, self.line, self.code, self.setup, self.skip = path, line, code, setup, skip


def doc_files(root=ROOT):
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def _directive_before(lines, i):
    """(kind, argument) of a `<!-- doc-test: ... -->` comment ending right above line i (blank
    lines allowed in between), else None."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return None
    k = j
    while k >= 0 and "<!--" not in lines[k]:
        k -= 1
    if k < 0:
        return None
    text = "\n".join(lines[k:j + 1]).strip()
    m = DIRECTIVE.match(text)
    if not m:
        return None
    return m.group(1), m.group(2)[: m.group(2).rfind("-->")]


def python_blocks(path, text=None):
    """The ```python (or ```py) blocks of a Markdown file, with their directives."""
    if text is None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if lang in ("python", "py"):
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            block = Block(path, i + 1, code)
            directive = _directive_before(lines, i)
            if directive is not None:
                kind, arg = directive
                if kind == "skip":
                    if not arg.strip():
                        raise ValueError(f"{path}:{i + 1}: `doc-test: skip` needs a reason")
                    block.skip = arg.strip()
                elif kind == "setup":
                    block.setup = arg.strip("\n")
                else:
                    raise ValueError(f"{path}:{i + 1}: unknown doc-test directive {kind!r} (setup or skip)")
            blocks.append(block)
        i = end + 1
    return blocks


def run_blocks(blocks, namespace):
    """Executes the blocks in order in ``namespace``; returns the skipped ones."""
    skipped = []
    for block in blocks:
        if block.skip:
            skipped.append(block)
            continue
        name = f"{os.path.relpath(block.path, ROOT)}:{block.line}"
        try:
            if block.setup:
                exec(compile(block.setup, f"{name} (doc-test setup)", "exec"), namespace)
            exec(compile(block.code, name, "exec"), namespace)
        except Exception:
            raise AssertionError(f"the ```python block at {name} failed:\n{block.code}\n\n"
                                 f"{traceback.format_exc()}") from None
    return skipped


FILES = [p for p in doc_files() if os.path.exists(p) and python_blocks(p)]


@pytest.mark.parametrize("path", FILES, ids=[os.path.relpath(p, ROOT) for p in FILES])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from doc_fixtures import doc_namespace

    monkeypatch.chdir(tmp_path)
    namespace = doc_namespace(tmp_path)
    namespace["__name__"] = "__doc_block__"
    skipped = run_blocks(python_blocks(path), namespace)
    for block in skipped:
        print(f"not run: {os.path.relpath(block.path, ROOT)}:{block.line}: {block.skip}")


def test_parser_finds_blocks_and_directives(tmp_path):
    text = "\n".join([
        "Intro", "```python", "x = 1", "```", "", "<!-- doc-test: setup", "y = x + 1", "-->", "",
        "```python", "z = y * 2", "```", "<!-- doc-test: skip needs 8 GPUs -->", "```python", "raise SystemExit",
        "```", "```bash", "echo no", "```", "- item", "  ```py", "  w = z + 1", "  ```"])
    blocks = python_blocks("x.md", text)
    assert [b.line for b in blocks] == [2, 10, 14, 21]
    assert blocks[1].setup.strip() == "y = x + 1" and blocks[2].skip == "needs 8 GPUs"
    ns = {}
    skipped = run_blocks(blocks, ns)
    assert ns["w"] == 5 and skipped == [blocks[2]]
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks("x.md", "<!-- doc-test: skip -->\n```python\npass\n```")
    with pytest.raises(AssertionError, match="x.md:2"):
        run_blocks(python_blocks("x.md", "ok\n```python\n1 / 0\n```"), {})


def test_every_docs_file_is_collected():
    """New docs files are picked up without editing this test."""
    names = {os.path.relpath(p, ROOT) for p in doc_files()}
    assert "README.md" in names and any(n.startswith("docs" + os.sep) for n in names)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from integration_helpers import reset_accelerate_state

    reset_accelerate_state()
