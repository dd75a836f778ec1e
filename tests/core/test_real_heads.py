"""The loader on real public heads (several scanners, four head positions); skipped where ../shared/data is absent."""

from __future__ import annotations

import numpy as np

from synth7t.io import from_canonical, load_volume, save_volume, to_canonical, voxel_to_world


def test_real_head_loads_and_round_trips_through_ras(real_head, tmp_path):
    vol = load_volume(real_head)
    can, info = to_canonical(vol)
    assert can.orientation == "RAS"
    # the same voxel is at the same world position in both orientations
    centre_src = voxel_to_world(vol.affine, (np.array(vol.shape) - 1) / 2)
    centre_can = voxel_to_world(can.affine, (np.array(can.shape) - 1) / 2)
    np.testing.assert_allclose(centre_src, centre_can, atol=1e-4)
    back = from_canonical(can, info)
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    out = load_volume(save_volume(tmp_path / "h.nii.gz", can))
    np.testing.assert_allclose(out.affine, can.affine, atol=1e-4)
    np.testing.assert_array_equal(out.data, can.data)
