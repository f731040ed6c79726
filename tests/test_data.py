"""Reference data views: subsets and splits stay what they claim to be."""

import datasets
import numpy as np
from PIL import Image

from hub_backdoor.sources.reference import ReferenceData


def _ds(n=20):
    imgs = [Image.fromarray(np.full((4, 4), i, dtype=np.uint8), mode="L") for i in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    return datasets.Dataset.from_dict({"image": imgs, "label": [i % 4 for i in range(n)]}, features=feats)


def test_wrapping_a_view_keeps_the_view():
    data = ReferenceData(_ds())
    fit, held = data.split(0.25, seed=0)
    assert len(fit) == 16 and len(held) == 4  # one of each five per class
    assert len(ReferenceData(fit)) == 16  # audit() wraps whatever it is given
    assert set(ReferenceData(fit).indices) == set(fit.indices)
    assert not set(fit.indices) & set(held.indices)


def test_split_is_stratified_and_seeded():
    data = ReferenceData(_ds(40))
    a, b = data.split(0.5, seed=3)
    c, d = data.split(0.5, seed=3)
    assert list(a.indices) == list(c.indices)
    assert sorted(lab for _, lab in (b[i] for i in range(len(b)))) == sorted([0, 1, 2, 3] * 5)


def test_subset_is_seeded_and_bounded():
    data = ReferenceData(_ds(40))
    s1, s2 = data.subset(10, seed=1), data.subset(10, seed=1)
    assert len(s1) == 10 and list(s1.indices) == list(s2.indices)
    assert data.subset(None, seed=1) is data and data.subset(100, seed=1) is data
