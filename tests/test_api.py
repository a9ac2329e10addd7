"""The Python API: README's example runs as written (paths pointed at tmp), and the public names exist."""
from __future__ import annotations

import re
from pathlib import Path

import torch

torch.set_num_threads(1)
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, warm_cache, capsys):
    from cramcl.data.stream import load_stream
    from conftest import quick_config

    text = README.read_text()
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S).group(1)
    image = next(r.image for t in load_stream(quick_config().data).tasks if t.name == "ocr" for r in t.test)
    code = (block.replace("runs/", f"{tmp_path}/runs/").replace('"my.png"', repr(str(image)))
            .replace('profile="quick", overrides=[', 'profile="quick", overrides=["train.steps_per_task=6", '))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "cosine to group prototypes" in out  # the routing explanation printed
    assert (tmp_path / "runs" / "api-demo-ocr-peft" / "adapter_config.json").exists()


def test_public_names_are_typed_and_documented():
    import inspect

    import cramcl

    for name in ("load_config", "run", "resume", "compare", "open_run"):
        fn = getattr(cramcl, name)
        assert fn.__doc__ and inspect.signature(fn).return_annotation is not inspect.Signature.empty, name
    assert issubclass(cramcl.Method, object) and cramcl.FinishedRun.predict.__doc__
