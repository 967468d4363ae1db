"""Identity folds for cross-fitted look-ahead labels, and prepare-data's fold bookkeeping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llava_reid.artifacts import ArtifactError
from llava_reid.data.folds import identity_folds, parse_fold
from llava_reid.dialogue.prepare_data import label_folds


def test_folds_split_identities_evenly_and_keep_an_identitys_images_together():
    pids = np.repeat(np.arange(10, 17), 2)  # 7 identities, 2 images each
    folds = identity_folds(pids, 3, seed=4)
    assert folds.shape == pids.shape and set(folds.tolist()) == {0, 1, 2}
    per_pid = pd.Series(folds).groupby(pids).nunique()
    assert (per_pid == 1).all()
    sizes = np.bincount(pd.Series(folds).groupby(pids).first(), minlength=3)
    assert sorted(sizes.tolist()) == [2, 2, 3]
    # Seeded, and independent of the order the rows come in.
    assert np.array_equal(identity_folds(pids, 3, seed=4), folds)
    shuffled = pids[::-1]
    assert np.array_equal(identity_folds(shuffled, 3, seed=4), folds[::-1])
    assert not np.array_equal(identity_folds(pids, 3, seed=5), folds)


def test_fold_arguments_are_checked():
    assert parse_fold(None) is None
    assert parse_fold("1/2") == (1, 2)
    for bad in ("2/2", "0/1", "a/2", "1"):
        with pytest.raises(ValueError, match="--fold"):
            parse_fold(bad)
    with pytest.raises(ValueError, match="at least 2 folds"):
        identity_folds([1, 2, 3], 1, seed=0)
    with pytest.raises(ValueError, match="2 identities cannot fill 3 folds"):
        identity_folds([1, 2, 2], 3, seed=0)


def test_prepare_data_labels_each_image_by_its_identitys_fold():
    rows = pd.DataFrame({"image_idx": [0, 1, 2, 3], "pid": [5, 5, 6, 7]})
    parts = label_folds(rows, ["f0.parquet", "f1.parquet"], [{5, 7}, {6}], folds=2)
    assert [p.image_idx.tolist() for p in parts] == [[0, 1, 3], [2]]
    with pytest.raises(ArtifactError, match="cross_fit is 3 but 2 fold galleries"):
        label_folds(rows, ["f0.parquet", "f1.parquet"], [{5, 7}, {6}], folds=3)
    with pytest.raises(ArtifactError, match="f1.parquet: identity 5 is also in .*f0.parquet"):
        label_folds(rows, ["f0.parquet", "f1.parquet"], [{5, 7}, {5, 6}], folds=2)
    with pytest.raises(ArtifactError, match=r"no fold gallery holds training identities \[7\]"):
        label_folds(rows, ["f0.parquet", "f1.parquet"], [{5}, {6}], folds=2)
