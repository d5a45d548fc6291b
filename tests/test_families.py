"""The family registry: one module per family, the support matrix in the README made from it,
and no code outside families/ asking which family it is handling."""

from __future__ import annotations

import ast
import re

import pytest

from minicpm_convert.families import families, family_for_config, support_matrix
from tests.conftest import ROOT

PACKAGE = ROOT / "minicpm_convert"
# Facts a family decides; outside families/ they may be read (shown, passed on), never branched on.
FAMILY_FACTS = {"mla", "rope_type", "rope_scaling", "hidden_act", "model_type", "variant", "family",
                "num_experts", "is_mup", "scale_depth", "dim_model_base"}


def test_readme_support_matrix_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- support-matrix -->\n(.*?)<!-- /support-matrix -->", readme, re.S)
    assert m, "README lacks the generated support matrix"
    assert m.group(1) == support_matrix(), "regenerate: python -m minicpm_convert.families"


def _conditions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, ast.match_case) and node.guard is not None:
            yield node.guard


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if "families" not in p.parts
                                        and p.name != "spec.py"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_family_branches_outside_families(path):
    tree = ast.parse(path.read_text())
    found = [f"line {node.lineno}: .{node.attr}" for cond in _conditions(tree) for node in ast.walk(cond)
             if isinstance(node, ast.Attribute) and node.attr in FAMILY_FACTS]
    assert not found, f"{path.name} branches on family facts: {found}"


def test_every_family_has_one_module_and_a_title():
    for f in families():
        assert type(f).__module__.startswith("minicpm_convert.families."), f
        assert f.name and f.title and f.examples, f


@pytest.mark.parametrize("cfg,name", [
    ({"model_type": "minicpm"}, "minicpm"),
    ({"model_type": "minicpm", "hidden_act": "fatrelu"}, "minicpm-s"),
    ({"model_type": "minicpm", "num_experts": 8}, "minicpm-moe"),
    ({"model_type": "minicpm3"}, "minicpm3"),
    ({"architectures": ["MiniCPM3ForCausalLM"]}, "minicpm3"),
    ({"model_type": "llama"}, "llama"),
    ({"model_type": "mixtral"}, "mixtral"),
])
def test_registry_recognises_each_config(cfg, name):
    assert family_for_config(cfg).name == name
