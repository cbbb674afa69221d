"""Provider selection and wire format, without MPI."""

import pytest

import blsfab
from blsfab import _core, provider


def test_aliases_map_to_layered_names():
    assert provider.canonical("tcp") == "tcp;ofi_rxm"
    assert provider.canonical("verbs") == "verbs;ofi_rxm"
    assert provider.canonical(" SHM ") == "shm"
    with pytest.raises(ValueError, match="not a libfabric provider"):
        provider.canonical("no such thing!")


@pytest.mark.parametrize("usable,same_host,expected", [
    (["verbs;ofi_rxm", "shm", "tcp;ofi_rxm"], True, "verbs;ofi_rxm"),
    (["verbs;ofi_rxm", "tcp;ofi_rxm"], False, "verbs;ofi_rxm"),
    (["shm", "tcp;ofi_rxm"], True, "shm"),
    (["shm", "tcp;ofi_rxm"], False, "tcp;ofi_rxm"),
])
def test_default_preference(usable, same_host, expected):
    assert provider.select(None, usable, same_host, environ={}) == expected


def test_explicit_and_environment_choices():
    usable = ["verbs;ofi_rxm", "shm", "tcp;ofi_rxm"]
    assert provider.select("tcp", usable, True, environ={}) == "tcp;ofi_rxm"
    assert provider.select(None, usable, True, environ={"FI_PROVIDER": "shm"}) == "shm"
    assert provider.select("verbs", usable, False, environ={"FI_PROVIDER": "shm"}) == "verbs;ofi_rxm"
    with pytest.raises(ValueError, match="not usable"):
        provider.select("verbs", ["shm"], True, environ={})


def test_disagreement_names_every_rank():
    assert provider.check_agreement(["shm", "shm"]) == "shm"
    with pytest.raises(ValueError, match="rank 1: 'tcp;ofi_rxm'"):
        provider.check_agreement(["shm", "tcp;ofi_rxm"])


def test_hints_cover_what_verbs_needs():
    # verbs;ofi_rxm needs LOCAL, VIRT_ADDR, ALLOCATED and PROV_KEY and offers 4 bytes of CQ data.
    asked = {name for name, bit in _core.MR_MODE_BITS.items() if _core.MR_MODE_SUPPORTED & bit}
    assert set(provider.EXPECTED_MR_MODE["verbs;ofi_rxm"]) <= asked
    assert _core.CQ_DATA_BYTES == 4


def test_immediate_data_fits_32_bits_and_round_trips():
    for kind in (0, 1):
        for rank in (0, 1, 16383):
            for count in (0, 1, 65535, 65536 + 7, 2**40 + 3):
                imm = _core.imm_encode(kind, rank, count)
                assert 0 <= imm < 2**32
                assert _core.imm_decode(imm, max(0, count - 1000)) == (kind, rank, count)


def test_counter_rebuilt_from_low_bits_across_wraparound():
    imm = _core.imm_encode(0, 3, 65536 + 2)
    assert _core.imm_decode(imm, 65530) == (0, 3, 65538)


def test_usable_providers_here():
    found = blsfab.providers()
    assert "shm" in found and "tcp;ofi_rxm" in found
    info = _core.FabricInfo.query("shm")
    assert info.cq_data_size >= 4 and "VIRT_ADDR" in info.mr_mode_names
