"""Engine pieces testable in one process: fi_info selection, registered
memory layout, and the checks on peers' address blobs."""

import mmap
import os
import struct

import pytest

from blsfab import _core


def entry(domain, provider="verbs;ofi_rxm", xrc=False, device=None, link_up=None):
    return {"provider": provider, "fabric": "IB-0xfe80", "domain": domain, "xrc": xrc,
            "device": device, "link_up": link_up}


def test_selection_skips_xrc_and_datagram_domains():
    cands = [entry("mlx5_0-xrc"), entry("mlx5_0", xrc=True), entry("mlx5_0-dgram"),
             entry("mlx5_0")]
    assert _core.choose_entry(cands, {}) == 3


def test_selection_skips_nics_whose_link_is_down():
    cands = [entry("mlx5_0", link_up=False), entry("mlx5_1", link_up=True)]
    assert _core.choose_entry(cands, {}) == 1
    assert _core.choose_entry([entry("mlx5_0", link_up=False)], {}) is None


def test_selection_honours_the_named_device():
    cands = [entry("mlx5_0", link_up=True), entry("mlx5_1-xrc"), entry("mlx5_1")]
    assert _core.choose_entry(cands, {"FI_VERBS_IFACE": "mlx5_1"}) == 2
    assert _core.choose_entry(cands, {"FI_VERBS_DEVICE_NAME": "mlx5_0"}) == 0
    with pytest.raises(ValueError, match="'mlx5_9'.*mlx5_0"):
        _core.choose_entry(cands, {"FI_VERBS_IFACE": "mlx5_9"})


def test_selection_ignores_verbs_variables_for_other_providers():
    cands = [entry("shm", provider="shm")]
    assert _core.choose_entry(cands, {"FI_VERBS_IFACE": "ib0"}) == 0


@pytest.fixture(scope="module")
def shm():
    info = _core.FabricInfo.query("shm")
    if info is None:
        pytest.skip("shm provider unavailable")
    return info


def test_chosen_entry_is_reported(shm):
    assert shm.chosen["provider"] == "shm" and not shm.chosen["xrc"]


def test_registered_memory_is_whole_pages_with_distinct_random_keys(shm):
    domain = _core.Domain(_core.Fabric(shm))
    bufs = [_core.RegisteredBuffer(domain, 5000, _core.MR_ACCESS["remote_write"], key)
            for key in (0x1234567890abcdef, 0x0fedcba987654321)]
    for b in bufs:
        assert b.address % mmap.PAGESIZE == 0 and b.nbytes % mmap.PAGESIZE == 0
        assert b.nbytes >= 5000
    for b in bufs:
        b.close()
    domain.close()


def engines(shm, slot_bytes=4096):
    return [_core.RingEngine(shm, r, 2, slot_bytes, 2, 8) for r in range(2)]


HEADER = struct.Struct("=IHHIIQIIQ")  # bls_address_header_t


def patched(blob, **fields):
    names = ["magic", "version", "header_bytes", "rank", "size", "slot_bytes", "ring_slots",
             "name_bytes", "ring_bytes"]
    values = dict(zip(names, HEADER.unpack_from(blob)))
    values.update(fields)
    out = bytearray(blob)
    HEADER.pack_into(out, 0, *(values[n] for n in names))
    return bytes(out)


def test_address_blobs_are_checked_field_by_field(shm):
    e0, e1 = engines(shm)
    b0, b1 = e0.local_address(), e1.local_address()
    assert isinstance(b0, bytes) and HEADER.size == 40
    assert HEADER.unpack_from(b1)[3:5] == (1, 2)
    other = _core.RingEngine(shm, 1, 2, 8192, 2, 8)
    # entry 0 of rank 1's blob: where rank 0 writes
    entry0 = HEADER.size + (HEADER.unpack_from(b1)[7] + 7) // 8 * 8
    bad = [
        (b1[:10], ValueError, "rank 1 is 10 bytes, shorter"),
        (patched(b1, magic=0x12345678), ValueError, "rank 1 is not a blsfab address"),
        (patched(b1, version=9), ValueError, "rank 1 has format version 9"),
        (patched(b1, rank=0), ValueError, "claims to be rank 0 of 2; expected rank 1"),
        (other.local_address(), ValueError, "rank 1 has slot_bytes=8192"),
        (patched(b1, name_bytes=100000), ValueError, "endpoint name of 100000 bytes"),
        (patched(b1, name_bytes=2 ** 32 - 1), ValueError, "endpoint name of 4294967295"),
        (b1 + b"\0" * 8, ValueError, "its header implies"),
        (b1[:entry0] + bytes(16) + b1[entry0 + 16:], ValueError, "which is no address"),
        (bytearray(b1), TypeError, "rank 1 is a bytearray, not bytes"),
    ]
    for blob, exc, words in bad:
        with pytest.raises(exc, match=words):
            e0.connect([b0, blob])
    with pytest.raises(ValueError, match="needs 2 address blobs"):
        e0.connect([b0])
    e0.connect([b0, b1])
    e1.connect([b0, b1])
    for e in (e0, e1, other):
        e.close()


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a/b", ".hidden", "x" * 129, "naïve"])
def test_a_bad_shm_region_name_is_refused_by_name(shm, bad):
    with pytest.raises(ValueError, match="region_name"):
        _core.RingEngine(shm, 0, 2, 4096, 2, 8, region_name=bad)


def test_a_named_shm_region_exists_until_it_is_unlinked(shm):
    name = f"blsfab-unit-{os.getpid():x}-ep0"
    engine = _core.RingEngine(shm, 0, 2, 4096, 2, 8, region_name=name)
    try:
        assert os.path.exists("/dev/shm/" + name)
        assert engine.unlink_region_name() is True
        assert not os.path.exists("/dev/shm/" + name)
        assert engine.unlink_region_name() is False  # already gone: not an error
    finally:
        engine.close()
