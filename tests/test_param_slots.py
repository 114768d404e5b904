"""The op's parameter slots are declared once, in dgsct_kernels/param_slots.def: Python reads
it (config.OP_PARAM_NAMES) and the C++ sources expand it (csrc/param_slots.h); both agree with
the module's state dict."""
import re
from pathlib import Path

import pytest

import dgsct_kernels
from dgsct_kernels import _extension
from dgsct_kernels.config import OP_PARAM_NAMES, OPTIONAL_GROUPS, _read_param_slots
from _support import make_module

ROOT = Path(__file__).resolve().parents[1]
DEF_FILE = Path(dgsct_kernels.__file__).with_name("param_slots.def")
# module state the op never reads: the unused gate_tk and BatchNorm's step counters
NOT_OP_STATE = {"gate_tk", "bn1.num_batches_tracked", "bn2.num_batches_tracked"}


def test_python_names_are_the_37_unique_state_dict_names_the_op_reads():
    assert len(OP_PARAM_NAMES) == 37 and len(set(OP_PARAM_NAMES)) == 37
    module = make_module()  # every optional layer on
    state = set(module.state_dict()) - NOT_OP_STATE
    assert set(OP_PARAM_NAMES) == state
    assert set(module.op_params()) - NOT_OP_STATE == state
    assert all(n in OP_PARAM_NAMES for names in OPTIONAL_GROUPS.values() for n in names)


def test_def_file_is_the_one_declaration():
    text = DEF_FILE.read_text()
    slots = re.findall(r'^DGSCT_SLOT\((k\w+), "([^"]+)"\)$', text, re.M)
    assert tuple(name for _, name in slots) == OP_PARAM_NAMES
    enumerators = [e for e, _ in slots]
    assert len(set(enumerators)) == len(enumerators)
    # no other list of the names in the sources: the C++ side includes the .def file
    for source in (ROOT / "csrc").rglob("*"):
        if source.suffix in (".h", ".cpp", ".cu"):
            assert '"conv_adapter.weight"' not in source.read_text(), source
            assert "enum Param" not in source.read_text() or source.name == "param_slots.h", source
    assert "param_slots.def" in (ROOT / "setup.py").read_text()  # shipped as package data


def test_reader_refuses_a_malformed_line(tmp_path):
    bad = tmp_path / "param_slots.def"
    bad.write_text('// a comment\nDGSCT_SLOT(kWtok, "conv_adapter.weight")\nDGSCT_SLOT(kBtok conv_adapter.bias)\n')
    with pytest.raises(RuntimeError, match="cannot read"):
        _read_param_slots(bad)
    bad.write_text('DGSCT_SLOT(kWtok, "a")\nDGSCT_SLOT(kBtok, "a")\n')
    with pytest.raises(RuntimeError, match="unique"):
        _read_param_slots(bad)


@pytest.mark.skipif(_extension._C is None, reason="the compiled extension is not built")
def test_cpp_side_agrees():
    assert tuple(_extension._C.param_slot_names()) == OP_PARAM_NAMES
