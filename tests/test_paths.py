"""`pkg:MODULE/FILE` specs: located without importing anything, a missing package in one line."""

from __future__ import annotations

import sys

import pytest

from mmpo_jax.errors import UserError
from mmpo_jax.paths import resolve


@pytest.fixture
def evil_package(tmp_path, monkeypatch):
    """A package in the working directory whose import would leave a marker file."""
    marker = tmp_path / "imported"
    for package in ("evilpkg", "evilpkg/sub"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({package!r})\n")
    (tmp_path / "evilpkg" / "sub" / "x.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, marker
    for name in ("evilpkg", "evilpkg.sub"):
        sys.modules.pop(name, None)


def test_a_dotted_pkg_spec_runs_no_code(evil_package):
    """`find_spec("evilpkg.sub")` imports evilpkg: a config could run a file it names."""
    root, marker = evil_package
    assert resolve("pkg:evilpkg.sub/x.gguf") == str(root / "evilpkg" / "sub" / "x.gguf")
    assert resolve("pkg:evilpkg/sub/x.gguf") == str(root / "evilpkg" / "sub" / "x.gguf")
    assert not marker.exists() and "evilpkg" not in sys.modules
    # negative control: importing it the way find_spec of a dotted name does leaves the marker
    import importlib.util

    importlib.util.find_spec("evilpkg.sub")
    assert marker.exists()


@pytest.mark.parametrize("spec, needle", [
    ("pkg:no_such_pkg_zz/x.gguf", "the package 'no_such_pkg_zz' is not installed"),
    ("pkg:no_such_pkg_zz.sub/x.gguf", "the package 'no_such_pkg_zz' is not installed"),
    ("pkg:evilpkg.nosub/x.gguf", "has no subpackage 'evilpkg.nosub'"),
    ("pkg:evilpkg/../../x.gguf", "leaves the package's directory"),
    ("pkg:evil-pkg/x.gguf", "is not a Python package name"),
    ("pkg:evilpkg/sub/missing.gguf", "has no file 'sub/missing.gguf'"),
])
def test_a_bad_pkg_spec_is_one_line(evil_package, spec, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        resolve(spec)
    assert not evil_package[1].exists()
