"""A published-layout model through the whole prediction path on real raw heads (slow; skipped without
../shared/data): N4 with the authors' settings, deepbet, a rigid + affine registration to a real template (the
deepmriprep brain template at 1 mm, standing in for the authors' 7T template), the network, and back onto the
scan's own frame. The weights are random (their output is irrelevant): what is checked is that the result lands
on the input and on the template."""

from __future__ import annotations

import numpy as np
import pytest

HEADS = ("dcmqaphilipsenh_1301_ADNI_Sag3D_MPRAGE.nii.gz", "dcmqadecubitus_HFDL_2_t1_fl2d_sag.nii.gz")


@pytest.fixture(scope="module")
def template_model(thesis, tmp_path_factory):
    from synth7t.demo.anatomy import template_path
    from synth7t.io import load_volume, save_volume
    from synth7t.preprocess.register import resample_to
    from synth7t.thesis import import_thesis

    root = tmp_path_factory.mktemp("realtemplate")
    t = load_volume(template_path())
    t1 = resample_to(t, 1.0)  # the template at 1 mm
    shape = t1.shape
    tmpl = save_volume(root / "t7.nii.gz", t1)
    params = {**thesis.SMALL, "n_channels": 8, "num_groups": 4, "slice_size": (shape[0], shape[2]),
              "n_slices": shape[1]}
    ckpt = thesis.save_authors_checkpoint(thesis.reference_net(params), root / "ck.pt")
    (root / "p.txt").write_text(str(params))
    return import_thesis(ckpt, root / "p.txt", tmpl, root / "model"), t1


@pytest.mark.slow
def test_raw_real_head_lands_on_its_input_and_on_the_template(real_head, template_model, tmp_path):
    from synth7t.inference import PredictOptions, predict
    from synth7t.io import load_volume, to_canonical, voxel_to_world
    from synth7t.preprocess.bias import n4
    from synth7t.preprocess.register import resample_to
    from synth7t.preprocess.skullstrip import strip

    if real_head.name not in HEADS:  # two heads are enough here: a sagittal MPRAGE and a decubitus 2-D scan
        pytest.skip("covered by the two heads of HEADS")
    head = real_head
    model, template = template_model
    res = predict(model, [head], tmp_path / "out", PredictOptions(age=70, sex="F", device="cpu"), progress=False)
    assert not res.failed, res.failed
    from synth7t.io import nifti_stem

    folder = tmp_path / "out" / nifti_stem(head)
    syn = load_volume(folder / "syn7t.nii.gz")
    assert np.isfinite(syn.data).all() and (syn.data != 0).any()
    canonical, _ = to_canonical(load_volume(head))
    mask, _ = strip(n4(canonical, "3t"), "deepbet")

    def com(v):
        return voxel_to_world(v.affine, np.argwhere(v.data != 0).mean(0))[0]

    assert np.linalg.norm(com(syn) - com(mask)) < 4.0  # mm: the output sits on the scan's brain
    on_template = load_volume(folder / "mask_space-thesis7T.nii.gz").data > 0
    tmpl = resample_to(template, (on_template.shape, load_volume(folder / "mask_space-thesis7T.nii.gz").affine),
                       order=0).data > 0
    dice = 2 * (on_template & tmpl).sum() / (on_template.sum() + tmpl.sum())
    assert dice > 0.8, dice  # and the registered brain on the template's
