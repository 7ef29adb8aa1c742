"""The README's promises: its Python example runs, and its Quick start matches .ci/run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_api_example_runs(capsys):
    block = re.search(r"## The Python API\s+```python\n(.*?)```", README, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    loss, n_tokens, count = capsys.readouterr().out.split()
    assert 5.5 < float(loss) < 7.0  # ~ln(512) at initialisation
    assert int(n_tokens) == 128 and int(count) > 1_000_000


def test_ci_installs_and_tests_as_the_readme_says():
    quick = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"pip install (-e '\.\[dev\]')", quick).group(1)
    assert f"pip install {install}" in ci
    test_cmd = re.search(r"\n(python -m pytest[^\n]*)", quick).group(1)
    assert test_cmd in ci
