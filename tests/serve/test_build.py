"""The build: the training flow and the standalone command turn the promoted tiny model into a Bento that holds
its OpenVINO export and every castbot module its code imports."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHARACTER, REPO

pytestmark = pytest.mark.service


def castbot_imports(src: Path) -> set[str]:
    """Every castbot module the Bento's own code imports (at the top or inside a function)."""
    import ast

    names = set()
    for path in [src / "service.py", *(src / "castbot").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "castbot":
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names
                                          if module_file(src, f"{node.module}.{a.name}")}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.split(".")[0] == "castbot"}
    return names


def module_file(src: Path, name: str) -> bool:
    path = src.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_flow_builds_a_bento_and_tags_the_model_version(trained):
    import bentoml
    from mlflow import MlflowClient

    from castbot.serve.engines.openvino import read_built_card

    version = MlflowClient().get_model_version(trained["model_name"], trained["version"])
    assert version.tags["castbot.bento"] == trained["bento"]
    bento = bentoml.get(trained["bento"])
    [model_tag] = [m.tag for m in bento.info.all_models]
    labels = bentoml.models.get(model_tag).info.labels
    assert labels["mlflow_model"] == "serve-bot" and labels["mlflow_version"] == trained["version"]
    assert labels["character"] == CHARACTER
    assert bento.info.args == {"model": str(model_tag)}
    src = Path(bento.path) / "src"
    assert (src / "castbot" / "model" / "dialogue.py").is_file() and (src / "web" / "chat.html").is_file()
    # the OpenVINO export made at build time, its test perplexity measured beside the model's own
    card = read_built_card(bentoml.models.get(model_tag).path)
    assert card["weights"] == "fp32" and card["reference_perplexity"] == pytest.approx(trained["perplexity"])
    assert card["fp32_test_perplexity"] == pytest.approx(trained["perplexity"], rel=0.01)
    assert version.tags["castbot.openvino"].startswith("fp32: test perplexity")
    assert not (src / "tasks").exists() and not (src / "flows").exists()
    missing = [name for name in castbot_imports(src) if not module_file(src, name)]
    assert not missing, f"the Bento's code imports castbot modules its bentofile leaves out: {missing}"


def test_standalone_command_builds_for_a_given_version(trained):
    from mlflow import MlflowClient

    done = subprocess.run([sys.executable, "-m", "tasks.release.bento", "--model", "serve-bot",
                           "--version", trained["version"]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = re.search(r"built (\S+);", done.stdout).group(1)
    assert tag.startswith("castbot-chat:") and tag != trained["bento"]
    assert MlflowClient().get_model_version("serve-bot", trained["version"]).tags["castbot.bento"] == tag

    missing = subprocess.run([sys.executable, "-m", "tasks.release.bento", "--model", "no-such-bot"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no-such-bot" in missing.stderr

    # the version's import holds fp32 OpenVINO weights; int8 would change what its Bentos serve
    other = subprocess.run([sys.executable, "-m", "tasks.release.bento", "--model", "serve-bot", "--version",
                            trained["version"], "--openvino", "int8"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 1 and "already imported with OpenVINO weights fp32, not int8" in other.stderr
    assert MlflowClient().get_model_version("serve-bot", trained["version"]).tags["castbot.bento"] == tag

