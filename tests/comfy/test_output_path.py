"""Where the training and saving nodes write: one function (`engine.files.output_path`) with every refusal."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("name", "subfolders", "says"), [
    ("", True, "relative name"), ("   ", True, "relative name"), ("/etc/passwd", True, "not absolute"),
    ("\\\\server\\share", True, "not absolute"), ("C:evil", True, "not absolute"), ("..", True, "no '..'"),
    ("../outside", True, "no '..'"), ("sub/../../outside", True, "no '..'"), ("sub/../inside", True, "no '..'"),
    ("sub//x", True, "relative name"), ("./x", True, "relative name"), ("sub/x", False, "plain file name"),
    ("sub\\x", False, "plain file name"), ("../x", False, "plain file name"),
])
def test_names_that_leave_the_folder_are_refused(pack, tmp_path, name, subfolders, says):
    with pytest.raises(pack.tlora_core.TLoRAError) as e:
        pack.engine.files.output_path(name, str(tmp_path), overwrite=True, subfolders=subfolders, where="the folder")
    assert says in str(e.value) and "the folder" in str(e.value), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_names_inside_the_folder_and_existing_files(pack, tmp_path):
    out = pack.engine.files.output_path
    assert out("tlora/run", str(tmp_path), False) == str(tmp_path / "tlora" / "run.safetensors")
    assert out(" run.safetensors ", str(tmp_path), False, subfolders=False) == str(tmp_path / "run.safetensors")
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(pack.tlora_core.TLoRAError, match="exists: choose another file name or switch on 'overwrite'"):
        out("taken", str(tmp_path), False)
    assert out("taken", str(tmp_path), True) == str(tmp_path / "taken.safetensors")


def test_both_nodes_use_it(pack):
    assert pack.nodes.train.output_path is pack.engine.files.output_path
    assert pack.nodes.save.output_path is pack.engine.files.output_path
