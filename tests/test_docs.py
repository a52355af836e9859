"""The words a user reads agree with the code: the options table with ``--help``, the trainer
page's flags with the manifest's, the map of the code with the tree, the README's links."""

from __future__ import annotations

import os
import re

import pytest

from sftprep import trainer
from sftprep.cli import parser_for
from sftprep.config import BuildConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def help_flags() -> set[str]:
    """Every long option ``sftprep build --help`` lists (``--no-x`` folded into ``--x``)."""
    parser = parser_for(BuildConfig, "build")
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    return {f for f in flags if f != "--help" and not (f.startswith("--no-") and
                                                       "--" + f[5:] in flags)}


def test_the_options_table_lists_exactly_the_options_of_help():
    rows = [line for line in read("docs/options.md").splitlines() if line.startswith("| `")]
    documented = {flag for row in rows for flag in re.findall(r"`(--[a-z-]+)`", row.split("|")[1])}
    assert documented, "no option rows found in docs/options.md"
    assert documented == help_flags(), (
        f"in --help only: {sorted(help_flags() - documented)}; "
        f"in docs/options.md only: {sorted(documented - help_flags())}")


def test_the_trainer_page_gives_the_packed_flags_the_manifest_gives():
    row = next(line for line in read("docs/trainer.md").splitlines()
               if line.startswith("| Megatron flags"))
    assert set(re.findall(r"`(--[a-z-]+)`", row)) == set(trainer.PACKED_FLAGS)


def test_the_map_of_the_code_names_every_module_and_no_other():
    named = set(re.findall(r"`((?:sftprep|jobs)/[a-z_]+\.py)`", read("docs/design.md")))
    tree = {f"{d}/{name}" for d in ("sftprep", "jobs") for name in os.listdir(os.path.join(ROOT, d))
            if name.endswith(".py")}
    assert named == tree, (f"not on the map: {sorted(tree - named)}; "
                           f"on the map but not in the tree: {sorted(named - tree)}")


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = read("README.md")
    assert len(text.encode()) < 15 * 1024
    links = re.findall(r"\]\(((?:docs|examples|bench|conf)/[^)#]+)", text)
    assert {"docs/inputs.md", "docs/options.md", "docs/design.md"} <= set(links)
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing


@pytest.mark.parametrize("page", sorted(p for p in os.listdir(os.path.join(ROOT, "docs"))
                                        if p.endswith(".md")))
def test_links_between_pages_resolve(page):
    text = read(f"docs/{page}")
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert os.path.exists(os.path.join(ROOT, "docs", link)), f"docs/{page}: {link}"
