"""Accelerator choice and host TSC rate, probed for real on this host."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from criserver.sandbox import accel
from criserver.sandbox.assets import GuestAssets


def _read_cache_and_boot_id(state_dir: Path) -> tuple[dict[str, str], str]:
    cache = json.loads((state_dir / "accel.json").read_text())
    return cache, Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_tsc_khz_is_plausible() -> None:
    khz = accel.read_tsc_khz()
    assert khz is not None, "no TSC rate found in sysfs, the kernel log or /proc/cpuinfo"
    assert 500_000 <= khz <= 10_000_000


async def test_without_kvm_or_assets_is_tcg(tmp_path: Path) -> None:
    a = await accel.detect(tmp_path, None, use_cache=False)
    assert a.name == "tcg"
    assert a.reason


@pytest.mark.vm
async def test_probe_boots_for_real_and_is_cached(
    tmp_path: Path, guest_assets: GuestAssets
) -> None:
    first = await accel.detect(tmp_path, guest_assets)
    assert first.name in ("kvm", "tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert first.name == "tcg"
    else:
        # Either the probe saw the marker, or it says why not.
        assert "probe" in first.reason
    cache, boot_id = _read_cache_and_boot_id(tmp_path)
    assert cache["boot_id"] == boot_id
    assert cache["name"] == first.name
    second = await accel.detect(tmp_path, guest_assets)
    assert second.name == first.name and second.reason.endswith("(cached)")


@pytest.mark.vm
async def test_probe_marker_is_reached_under_tcg(tmp_path: Path, guest_assets: GuestAssets) -> None:
    # The probe's mechanics (boot to /init, marker, QEMU exit) checked with an accelerator that
    # works here: a broken probe would otherwise silently mean "no KVM" forever.
    result = await accel._probe(
        tmp_path, guest_assets, "qemu-system-x86_64", 60.0, accel_name="tcg"
    )
    assert result.name == "tcg" and "booted to /init" in result.reason
