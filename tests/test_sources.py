"""Modality sources: reading rows, transforms, feature alignment by name, errors that name the culprit."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.formats import source_for
from unimodality.plugins.sources.table import TableSource
from unimodality.sources import DataError, align_features, apply_transform, rows_with_nonzero

N_ROWS, N_GENES = 7, 6
GENES = [f"g{i}" for i in range(N_GENES)]


def counts_matrix(n_rows: int = N_ROWS, n_cols: int = N_GENES, seed: int = 0) -> np.ndarray:
    """Integer-valued counts with some zeros; one row entirely zero (the 3rd) to check zero rows."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n_rows, n_cols)).astype(np.float32)
    x[rng.random((n_rows, n_cols)) < 0.3] = 0
    x[2] = 0
    x[0, 0] = 5  # never an all-zero matrix
    return x


def write_h5ad(path: Path, x, var_names=GENES, layers=None, obsm=None, obs=None) -> Path:
    n = x.shape[0]
    obs = obs if obs is not None else pd.DataFrame(
        {"sample": [f"s{i % 3}" for i in range(n)], "dose": np.arange(n, dtype=float)},
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=x, obs=obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about duplicate names (wanted in some tests)
        adata.var_names = list(var_names)
    for name, value in (layers or {}).items():
        adata.layers[name] = value
    for name, value in (obsm or {}).items():
        adata.obsm[name] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)
    return path


def table_frame(x: np.ndarray, names=None) -> pd.DataFrame:
    names = names or [f"feat_{n}" for n in GENES[: x.shape[1]]]
    frame = pd.DataFrame(
        {"well": [f"w{i}" for i in range(len(x))], "plate": ["p1"] * len(x),
         "dose": np.arange(len(x), dtype=float)}
    )
    for j, name in enumerate(names):
        frame[name] = x[:, j]
    return frame


@pytest.fixture
def x() -> np.ndarray:
    return counts_matrix()


@pytest.fixture
def h5ad_files(tmp_path, x) -> dict[str, Path]:
    layer = (x * 3 + 1).astype(np.float32)
    embedding = np.arange(N_ROWS * 3, dtype=np.float32).reshape(N_ROWS, 3) / 7
    return {
        "dense": write_h5ad(tmp_path / "dense.h5ad", x, layers={"scaled": layer}, obsm={"X_emb": embedding}),
        "csr": write_h5ad(tmp_path / "csr.h5ad", sp.csr_matrix(x), layers={"scaled": sp.csr_matrix(layer)},
                          obsm={"X_emb": embedding}),
        "csc": write_h5ad(tmp_path / "csc.h5ad", sp.csc_matrix(x)),
    }


@pytest.fixture
def parquet_file(tmp_path, x) -> Path:
    path = tmp_path / "table.parquet"
    table_frame(x).to_parquet(path, index=False)
    return path


def dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


# -- reading rows ----------------------------------------------------------------------------------

ROW_ORDERS = [
    np.array([0, 1, 2, 3, 4, 5, 6]),
    np.array([5, 0, 3]),  # unsorted
    np.array([4, 4, 1, 4, 0, 1]),  # unsorted with repeats
    np.array([6]),
]


@pytest.mark.parametrize("kind", ["dense", "csr", "csc"])
@pytest.mark.parametrize("rows", ROW_ORDERS, ids=lambda r: "-".join(map(str, r)))
def test_anndata_reads_requested_rows_in_order(h5ad_files, x, kind, rows):
    source = AnnDataSource(str(h5ad_files[kind]))
    out = source.read_features(rows)
    assert sp.issparse(out) == (kind != "dense")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(dense(out), x[rows])
    assert source.feature_names() == GENES
    assert source.num_rows() == N_ROWS


@pytest.mark.parametrize("kind", ["dense", "csr", "csc"])
def test_anndata_reads_all_rows_when_none(h5ad_files, x, kind):
    np.testing.assert_array_equal(dense(AnnDataSource(str(h5ad_files[kind])).read_features()), x)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_anndata_layer(h5ad_files, x, kind):
    source = AnnDataSource(str(h5ad_files[kind]), layer="scaled")
    rows = np.array([3, 0, 3, 6])
    np.testing.assert_array_equal(dense(source.read_features(rows)), (x * 3 + 1)[rows])
    assert source.feature_names() == GENES  # a layer shares var names with X


def test_anndata_obsm(h5ad_files):
    source = AnnDataSource(str(h5ad_files["csr"]), obsm="X_emb")
    embedding = np.arange(N_ROWS * 3, dtype=np.float32).reshape(N_ROWS, 3) / 7
    rows = np.array([6, 2, 2, 0])
    np.testing.assert_allclose(source.read_features(rows), embedding[rows])
    assert source.feature_names() == ["X_emb_0", "X_emb_1", "X_emb_2"]
    assert source.num_rows() == N_ROWS


def test_anndata_layer_and_obsm_are_exclusive(h5ad_files):
    with pytest.raises(ValueError, match="layer or obsm"):
        AnnDataSource(str(h5ad_files["dense"]), layer="scaled", obsm="X_emb")


def test_anndata_metadata(h5ad_files):
    source = AnnDataSource(str(h5ad_files["dense"]))
    meta = source.read_metadata(["dose", "sample"])
    assert list(meta.columns) == ["dose", "sample"]
    np.testing.assert_array_equal(meta["dose"].to_numpy(), np.arange(N_ROWS, dtype=float))
    assert set(source.read_metadata().columns) == {"sample", "dose"}


@pytest.mark.parametrize("rows", ROW_ORDERS, ids=lambda r: "-".join(map(str, r)))
def test_table_reads_requested_rows_in_order(parquet_file, x, rows):
    source = TableSource(str(parquet_file), feature_prefix="feat_")
    out = source.read_features(rows)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, x[rows])
    assert source.feature_names() == [f"feat_{g}" for g in GENES]
    assert source.num_rows() == N_ROWS


def test_table_selects_features_by_list_regex_and_prefix(parquet_file, x):
    by_list = TableSource(str(parquet_file), features=["feat_g4", "feat_g1"])
    np.testing.assert_array_equal(by_list.read_features(), x[:, [4, 1]])  # the listed order
    by_regex = TableSource(str(parquet_file), feature_regex=r"g[0-2]$")
    assert by_regex.feature_names() == ["feat_g0", "feat_g1", "feat_g2"]
    np.testing.assert_array_equal(by_regex.read_features(np.array([2, 1])), x[[2, 1]][:, :3])


def test_table_metadata_is_every_other_column(parquet_file):
    source = TableSource(str(parquet_file), feature_prefix="feat_")
    meta = source.read_metadata()
    assert list(meta.columns) == ["well", "plate", "dose"]
    assert meta["well"].tolist() == [f"w{i}" for i in range(N_ROWS)]
    assert list(source.read_metadata(["dose"]).columns) == ["dose"]


@pytest.mark.parametrize("name, sep", [("table.csv", ","), ("table.tsv", "\t"), ("table.csv.gz", ",")])
def test_text_tables_read_like_parquet(tmp_path, x, name, sep):
    path = tmp_path / name
    table_frame(x).to_csv(path, sep=sep, index=False)
    source = TableSource(str(path), feature_prefix="feat_")
    rows = np.array([5, 1, 1])
    np.testing.assert_array_equal(source.read_features(rows), x[rows])
    assert source.read_metadata(["well"])["well"].tolist() == [f"w{i}" for i in range(N_ROWS)]
    assert source.num_rows() == N_ROWS
    source.close()
    assert source._table is None  # close() drops the cached text table


def test_source_for_picks_the_class_by_extension():
    assert source_for("a/b.h5ad") is AnnDataSource
    for name in ("x.parquet", "x.pq", "x.csv", "x.CSV.GZ", "x.tsv.gz"):
        assert source_for(name) is TableSource
    with pytest.raises(DataError, match=r"b\.xlsx.*unsupported"):
        source_for("a/b.xlsx")


# -- transforms ------------------------------------------------------------------------------------

def clr_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.log1p(x / np.exp(np.log1p(x).mean(axis=1, keepdims=True)))


@pytest.mark.parametrize("make", [np.asarray, sp.csr_matrix], ids=["dense", "csr"])
def test_log1p(x, make):
    out = apply_transform(make(x), "log1p")
    assert sp.issparse(out) == sp.issparse(make(x))
    np.testing.assert_allclose(dense(out), np.log1p(x), rtol=1e-6)


@pytest.mark.parametrize("make", [np.asarray, sp.csr_matrix], ids=["dense", "csr"])
def test_normalize_log1p(x, make):
    out = dense(apply_transform(make(x), "normalize_log1p"))
    assert out.dtype == np.float32
    totals = np.expm1(out.astype(np.float64)).sum(axis=1)
    nonzero = x.sum(axis=1) > 0
    assert (~nonzero).sum() == 1  # the fixture has one empty row
    np.testing.assert_allclose(totals[nonzero], 1e4, rtol=1e-4)
    np.testing.assert_array_equal(out[~nonzero], 0)  # zero rows stay zero (no NaN from 0/0)
    expected = np.log1p(x / x.sum(axis=1, keepdims=True).clip(min=1) * 1e4)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("make", [np.asarray, sp.csr_matrix], ids=["dense", "csr"])
def test_clr_matches_formula(x, make):
    out = apply_transform(make(x), "clr")
    assert out.dtype == np.float32
    np.testing.assert_allclose(dense(out), clr_reference(x), rtol=1e-5, atol=1e-6)
    # zero counts stay zero; the empty row stays zero (geometric mean exp(0) = 1)
    np.testing.assert_array_equal(dense(out)[x == 0], 0)


@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("transform", ["log1p", "normalize_log1p", "clr"])
def test_read_features_applies_transform_to_requested_rows(h5ad_files, x, kind, transform):
    rows = np.array([4, 2, 0])
    source = AnnDataSource(str(h5ad_files[kind]), transform=transform)
    expected = dense(apply_transform(x[rows], transform))
    if transform in ("normalize_log1p", "clr"):  # row 2 is all zero: an error for training, zeros when embedding
        with pytest.raises(DataError, match=r"1 rows are all zero \(e.g. rows \[2\]\)"):
            source.read_features(rows)
        with pytest.warns(UserWarning, match="embedded as zero vectors"):
            got = source.read_features(rows, empty_rows="warn")
    else:
        got = source.read_features(rows)
    np.testing.assert_allclose(dense(got), expected, rtol=1e-6)
    if transform == "clr":  # CLR is per row: reading a subset equals transforming everything then slicing
        np.testing.assert_allclose(expected, clr_reference(x)[rows], rtol=1e-5, atol=1e-6)


def many_counts(n_rows: int = 40_000) -> sp.csr_matrix:
    """Counts over more rows than one block of the in-place transform (16,384), with empty rows."""
    x = counts_matrix(n_rows, 8, seed=1)
    x[[16_383, 16_384, 39_999]] = 0  # empty rows at a block's end, a block's start and the last row
    return sp.csr_matrix(x)


@pytest.mark.parametrize("transform", ["log1p", "normalize_log1p"])
def test_inplace_csr_transform_equals_the_copying_one(transform):
    matrix = many_counts()
    expected = apply_transform(matrix.copy(), transform)
    data = matrix.data
    got = apply_transform(matrix, transform, inplace=True)
    assert got is matrix and got.data is data  # overwritten, no copy of the values
    np.testing.assert_array_equal(got.toarray(), expected.toarray())  # the same float32 values, bit for bit


@pytest.mark.parametrize("make", [np.asarray, sp.csr_matrix], ids=["dense", "csr"])
@pytest.mark.parametrize("transform", ["log1p", "normalize_log1p", "clr"])
def test_transform_leaves_its_input_alone_unless_inplace(x, make, transform):
    # evaluation transforms a caller's matrix (inplace=False): it must come back unchanged
    matrix = make(x.copy())
    apply_transform(matrix, transform)
    np.testing.assert_array_equal(dense(matrix), x)


def test_inplace_transform_copies_what_it_cannot_overwrite(x):
    # float64 values, or a read-only array (e.g. memory-mapped), are transformed into a new matrix
    wide = sp.csr_matrix(x.astype(np.float64))
    locked = sp.csr_matrix(x)
    locked.data.flags.writeable = False
    for matrix in (wide, locked):
        before = matrix.toarray()
        out = apply_transform(matrix, "normalize_log1p", inplace=True)
        assert out is not matrix and out.dtype == np.float32
        np.testing.assert_array_equal(matrix.toarray(), before)


def test_rows_with_nonzero_counts_stored_zeros_as_zeros():
    matrix = many_counts()
    np.testing.assert_array_equal(rows_with_nonzero(matrix), np.asarray(matrix.sum(axis=1)).ravel() > 0)
    # rows whose stored values are all zero (explicit zeros, kept by scipy) are empty too, in every block
    for row in (5, 20_000, 39_998):
        matrix.data[matrix.indptr[row]:matrix.indptr[row + 1]] = 0
    matrix.data[matrix.indptr[7]] = 0  # one stored zero in a row with other values: not empty
    assert matrix.nnz == many_counts().nnz  # the zeros are stored
    expected = np.asarray(abs(matrix).sum(axis=1)).ravel() > 0
    assert not expected[[5, 20_000, 39_998, 16_384]].any() and expected[7]
    np.testing.assert_array_equal(rows_with_nonzero(matrix), expected)
    np.testing.assert_array_equal(rows_with_nonzero(matrix.toarray()), expected)


def test_unknown_transform_is_refused(parquet_file):
    with pytest.raises(ValueError, match="unknown transform 'zscore'"):
        TableSource(str(parquet_file), feature_prefix="feat_", transform="zscore")


# -- aligning features by name ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_align_to_another_gene_order_gives_identical_matrix(tmp_path, x, kind):
    rng = np.random.default_rng(1)
    perm = rng.permutation(N_GENES)
    shuffled_x = x[:, perm]
    make = sp.csr_matrix if kind == "csr" else np.asarray
    reference = AnnDataSource(str(write_h5ad(tmp_path / "ref.h5ad", make(x))))
    shuffled = AnnDataSource(
        str(write_h5ad(tmp_path / "shuffled.h5ad", make(shuffled_x), var_names=[GENES[i] for i in perm])),
        transform="log1p",
    )
    rows = np.array([6, 1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is missing: no warning
        aligned = shuffled.read_features(rows, align_to=reference.feature_names())
    assert sp.issparse(aligned) == (kind == "csr")
    np.testing.assert_allclose(dense(aligned), np.log1p(x[rows]), rtol=1e-6)
    # without aligning, the columns are in the file's own order
    np.testing.assert_allclose(dense(shuffled.read_features(rows)), np.log1p(shuffled_x[rows]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_align_to_subset_zero_fills_and_warns(tmp_path, x, kind):
    make = sp.csr_matrix if kind == "csr" else np.asarray
    kept = [4, 0, 2]  # the file lacks g1, g3, g5 and has its columns in another order
    path = write_h5ad(tmp_path / "subset.h5ad", make(x[:, kept]), var_names=[GENES[i] for i in kept])
    source = AnnDataSource(str(path))
    with pytest.warns(UserWarning, match=r"3 of the model's 6 features are missing") as record:
        aligned = source.read_features(align_to=GENES)
    message = str(record[0].message)
    assert "subset.h5ad" in message and "g1" in message
    expected = np.zeros_like(x)
    expected[:, kept] = x[:, kept]
    np.testing.assert_array_equal(dense(aligned), expected)


def test_align_to_extra_file_features_are_dropped(tmp_path, x):
    source = AnnDataSource(str(write_h5ad(tmp_path / "wide.h5ad", sp.csr_matrix(x))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aligned = source.read_features(np.array([1, 0]), align_to=["g5", "g2"])
    np.testing.assert_array_equal(dense(aligned), x[[1, 0]][:, [5, 2]])


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_align_to_no_overlap_raises(tmp_path, x, kind):
    make = sp.csr_matrix if kind == "csr" else np.asarray
    source = AnnDataSource(str(write_h5ad(tmp_path / "other.h5ad", make(x))))
    with pytest.raises(DataError, match=r"other\.h5ad.*none of its 6 feature names match the 2 features"):
        source.read_features(align_to=["ENSG1", "ENSG2"])


def test_align_to_table(tmp_path, x):
    names = [f"feat_{g}" for g in GENES]
    path = tmp_path / "t.parquet"
    table_frame(x).to_parquet(path, index=False)
    source = TableSource(str(path), feature_prefix="feat_")
    rows = np.array([3, 3, 0])
    reversed_names = names[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(source.read_features(rows, align_to=reversed_names), x[rows][:, ::-1])

    # a file with only some of the model's columns (and an unrelated one): zeros + a warning
    partial = tmp_path / "partial.parquet"
    table_frame(x[:, [1, 3]], names=["feat_g1", "feat_g3"]).assign(other=1.0).to_parquet(partial, index=False)
    partial_source = TableSource(str(partial), feature_prefix="feat_")
    with pytest.warns(UserWarning, match=r"partial\.parquet: 4 of the model's 6 features are missing"):
        aligned = partial_source.read_features(rows, align_to=names)
    expected = np.zeros((len(rows), N_GENES), dtype=np.float32)
    expected[:, [1, 3]] = x[rows][:, [1, 3]]
    np.testing.assert_array_equal(aligned, expected)

    with pytest.raises(DataError, match=r"partial\.parquet: none of the model's 2 feature columns"):
        partial_source.read_features(align_to=["feat_g0", "feat_g2"])


def test_align_features_function_keeps_sparse_structure(x):
    m = sp.csr_matrix(x)
    target = ["g3", "missing", "g0"]
    with pytest.warns(UserWarning, match="1 of the model's 3 features"):
        out = align_features(m, GENES, target, Path("f.h5ad"))
    assert sp.isspmatrix_csr(out) and out.has_sorted_indices
    expected = np.zeros((N_ROWS, 3), dtype=np.float32)
    expected[:, 0], expected[:, 2] = x[:, 3], x[:, 0]
    np.testing.assert_array_equal(out.toarray(), expected)


# -- errors that name the file and the culprit -----------------------------------------------------

def test_missing_file(tmp_path):
    for source in (AnnDataSource(str(tmp_path / "nope.h5ad")),
                   TableSource(str(tmp_path / "nope.parquet"), feature_prefix="f")):
        with pytest.raises(FileNotFoundError, match=r"file not found: .*nope\."):
            source.read_features()
        with pytest.raises(FileNotFoundError, match="nope"):
            source.read_metadata()


def test_missing_obs_column(h5ad_files):
    source = AnnDataSource(str(h5ad_files["dense"]))
    with pytest.raises(DataError, match=r"dense\.h5ad: obs has no column\(s\) \['smiles'\]; available: "
                                        r"\['sample', 'dose'\]"):
        source.read_metadata(["dose", "smiles"])


def test_missing_table_column(parquet_file):
    source = TableSource(str(parquet_file), feature_prefix="feat_")
    with pytest.raises(DataError, match=r"table\.parquet: has no column\(s\) \['smiles'\]"):
        source.read_metadata(["smiles", "well"])


def test_missing_listed_feature_column(parquet_file):
    source = TableSource(str(parquet_file), features=["feat_g0", "feat_zz"])
    with pytest.raises(DataError, match=r"table\.parquet: feature column\(s\) not found: \['feat_zz'\]"):
        source.read_features()


def test_missing_layer_lists_available(h5ad_files):
    source = AnnDataSource(str(h5ad_files["dense"]), layer="counts")
    message = r"dense\.h5ad: has no 'layers/counts' \(available layers: \['scaled'\]\)"
    with pytest.raises(DataError, match=message):
        source.read_features()
    with pytest.raises(DataError, match="available layers"):
        source.num_rows()


def test_missing_obsm_lists_available(h5ad_files):
    source = AnnDataSource(str(h5ad_files["csr"]), obsm="X_umap")
    with pytest.raises(DataError, match=r"csr\.h5ad: has no 'obsm/X_umap' \(available obsm: \['X_emb'\]\)"):
        source.feature_names()


@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_h5ad_values_name_row_and_feature(tmp_path, x, kind, bad):
    x = x.copy()
    x[4, 2] = bad
    make = sp.csr_matrix if kind == "csr" else np.asarray
    source = AnnDataSource(str(write_h5ad(tmp_path / "bad.h5ad", make(x))))
    # rows that do not include the bad one read fine
    np.testing.assert_array_equal(dense(source.read_features(np.array([0, 5, 1]))), x[[0, 5, 1]])
    # the message gives the row of the file (not of the block read) and the feature name
    message = r"bad\.h5ad: 1 NaN or infinite feature values in 1 rows \(e\.g\. row 4 / g2\)"
    with pytest.raises(DataError, match=message):
        source.read_features(np.array([6, 4, 0]))
    with pytest.raises(DataError, match=r"row 4 / g2"):
        source.read_features()


def test_null_table_value_names_row_and_feature(tmp_path, x):
    frame = table_frame(x)
    frame["feat_g3"] = frame["feat_g3"].astype(object)
    frame.loc[5, "feat_g3"] = None
    frame["feat_g3"] = frame["feat_g3"].astype("float64")
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    source = TableSource(str(path), feature_prefix="feat_")
    with pytest.raises(DataError, match=r"nulls\.parquet: .*row 5 / feat_g3"):
        source.read_features()


@pytest.mark.filterwarnings("ignore:invalid value encountered in log1p:RuntimeWarning")
def test_negative_values_fail_after_transform(tmp_path, x):
    x = x.copy()
    x[1, 0] = -3.0  # log1p(-3) is NaN
    source = AnnDataSource(str(write_h5ad(tmp_path / "neg.h5ad", x)), transform="log1p")
    with pytest.raises(DataError, match=r"neg\.h5ad: .* after the 'log1p' transform .*row 1 / g0"):
        source.read_features()


def test_non_numeric_feature_column_is_named(tmp_path, x):
    frame = table_frame(x)
    frame["feat_label"] = ["a"] * N_ROWS
    path = tmp_path / "strings.parquet"
    frame.to_parquet(path, index=False)
    source = TableSource(str(path), feature_prefix="feat_")
    with pytest.raises(DataError, match=r"strings\.parquet: feature columns must be numeric.*feat_label"):
        source.read_features()
    # the same column, selected by name, fails the same way; numeric ones alone are fine
    with pytest.raises(DataError, match="feat_label"):
        TableSource(str(path), features=["feat_g0", "feat_label"]).read_features()
    np.testing.assert_array_equal(TableSource(str(path), features=["feat_g0"]).read_features(), x[:, [0]])


def test_boolean_and_integer_feature_columns_are_numeric(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b", "c"], "f_int": [1, 2, 3], "f_bool": [True, False, True]})
    path = tmp_path / "kinds.parquet"
    frame.to_parquet(path, index=False)
    out = TableSource(str(path), feature_prefix="f_").read_features()
    np.testing.assert_array_equal(out, [[1, 1], [2, 0], [3, 1]])


def test_duplicate_feature_names(tmp_path, x, parquet_file):
    names = ["g0", "g1", "g1", "g3", "g4", "g0"]
    source = AnnDataSource(str(write_h5ad(tmp_path / "dups.h5ad", x, var_names=names)))
    # duplicates are listed in the order of their second occurrence
    message = r"dups\.h5ad: 2 feature names occur more than once \(e\.g\. 'g1', 'g0'\)"
    with pytest.raises(DataError, match=message):
        source.read_features()
    listed = TableSource(str(parquet_file), features=["feat_g0", "feat_g0"])
    with pytest.raises(DataError, match=r"table\.parquet: 1 feature names occur more than once"):
        listed.read_features()


@pytest.mark.parametrize(
    "selection",
    [{}, {"features": ["a"], "feature_prefix": "f"}, {"feature_prefix": "f", "feature_regex": "x"},
     {"features": ["a"], "feature_prefix": "f", "feature_regex": "x"}],
    ids=["none", "list+prefix", "prefix+regex", "all"],
)
def test_table_needs_exactly_one_feature_selection(selection):
    with pytest.raises(ValueError, match=r"exactly one of features .*\(path: some/t\.parquet\)"):
        TableSource("some/t.parquet", **selection)


@pytest.mark.parametrize("selection, what", [({"feature_prefix": "cp_"}, "prefix 'cp_'"),
                                             ({"feature_regex": "^Cells_"}, "regex '\\^Cells_'")])
def test_selection_that_matches_nothing(parquet_file, selection, what):
    source = TableSource(str(parquet_file), **selection)
    with pytest.raises(DataError, match=rf"table\.parquet: no column matches the feature {what}; columns: "
                                        r"\['well', 'plate'"):
        source.read_features()


# -- describe --------------------------------------------------------------------------------------

def test_describe_anndata(h5ad_files):
    source = AnnDataSource(str(h5ad_files["csr"]), layer="scaled", key_columns=["sample"], transform="log1p")
    described = source.describe()
    assert described == {
        "class_path": "unimodality.plugins.sources.anndata.AnnDataSource",
        "init_args": {"layer": "scaled", "obsm": None, "obsm_alternatives": None, "alternative_weights": None,
                      "key_columns": ["sample"], "transform": "log1p", "include": None, "exclude": None,
                      "metadata_features": None},
        "features": GENES,
        "input": "vectors",
    }
    # the description rebuilds a source that reads a new file the same way
    rebuilt = AnnDataSource(str(h5ad_files["dense"]), **described["init_args"])
    np.testing.assert_allclose(dense(rebuilt.read_features()), dense(source.read_features()))


def test_describe_table_resolves_prefix(parquet_file):
    source = TableSource(str(parquet_file), feature_prefix="feat_", transform="clr")
    described = source.describe()
    features = [f"feat_{g}" for g in GENES]
    assert described["class_path"] == "unimodality.plugins.sources.table.TableSource"
    assert "path" not in described["init_args"]
    assert described["features"] == features
    assert described["init_args"] == {
        "features": features, "feature_prefix": None, "feature_regex": None, "key_columns": None,
        "transform": "clr", "include": None, "exclude": None, "metadata_features": None,
    }
    rebuilt = TableSource(str(parquet_file), **described["init_args"])
    np.testing.assert_array_equal(rebuilt.read_features(empty_rows="warn"), source.read_features(empty_rows="warn"))
    # describing does not change how the source itself selects columns
    assert source.feature_prefix == "feat_" and source.features is None


# -- real data -------------------------------------------------------------------------------------

def test_real_citeseq_rna_and_adt(shared_data):
    folder = shared_data / "citefuse_eccite_pbmc"
    rna = AnnDataSource(str(folder / "rna_counts.h5ad"), transform="normalize_log1p")
    assert rna.num_rows() == 500
    names = rna.feature_names()
    assert len(names) == 19_521 and len(set(names)) == len(names)
    rows = np.array([499, 0, 250, 0])
    block = rna.read_features(rows)
    assert sp.isspmatrix_csr(block) and block.shape == (4, 19_521)
    assert np.isfinite(block.data).all()
    np.testing.assert_allclose(np.expm1(block.toarray().astype(np.float64)).sum(axis=1), 1e4, rtol=1e-3)
    np.testing.assert_array_equal(block[1].toarray(), block[3].toarray())  # row 0 read twice

    every = rna.read_features()
    assert every.shape == (500, 19_521) and np.isfinite(every.data).all()
    np.testing.assert_allclose(every[rows].toarray(), block.toarray())

    adt = TableSource(str(folder / "adt_counts.parquet"), feature_regex=r"^(?!barcode$)", transform="clr")
    proteins = adt.feature_names()
    assert len(proteins) == 49 and "barcode" not in proteins and "CD3" in proteins
    assert list(adt.read_metadata().columns) == ["barcode"]
    values = adt.read_features()
    assert values.shape == (500, 49) and np.isfinite(values).all()
    raw = pd.read_parquet(folder / "adt_counts.parquet", columns=proteins).to_numpy()
    np.testing.assert_allclose(values, clr_reference(raw), rtol=1e-4, atol=1e-5)
    # the same proteins in the h5ad copy, aligned by name, give the same values
    adt_h5ad = AnnDataSource(str(folder / "adt_counts.h5ad"), transform="clr")
    np.testing.assert_allclose(dense(adt_h5ad.read_features(align_to=proteins)), values, rtol=1e-5, atol=1e-6)


# -- vector (list) columns: one embedding per row ------------------------------------------------------------

def embedding_tables(tmp_path: Path, kind: str = "list", n: int = 40, width: int = 6):
    """The same features as scalar columns and as one list column of ``kind``; plus a scalar extra."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(n, width)).astype(np.float32)
    meta = {"smiles": [f"C{i % 10}" for i in range(n)], "extra": rng.normal(size=n).astype(np.float32)}
    scalar = pa.table({**meta, **{f"pheno_embedding[{j}]": values[:, j] for j in range(width)}})
    types = {"list": pa.list_(pa.float32()), "large_list": pa.large_list(pa.float64()),
             "fixed_size_list": pa.list_(pa.float32(), width)}
    vector = pa.table({**meta, "pheno_embedding": pa.array(list(values), type=types[kind])})
    pq.write_table(scalar, tmp_path / "scalar.parquet")
    pq.write_table(vector, tmp_path / "vector.parquet")
    return tmp_path / "scalar.parquet", tmp_path / "vector.parquet", values


@pytest.mark.parametrize("kind", ["list", "large_list", "fixed_size_list"])
def test_a_list_column_gives_its_elements_as_features(tmp_path, kind):
    scalar_file, vector_file, values = embedding_tables(tmp_path, kind)
    source = TableSource(str(vector_file), features=["pheno_embedding"])
    assert source.feature_names() == [f"pheno_embedding[{j}]" for j in range(6)]
    np.testing.assert_array_equal(source.read_features(), values)
    scalar = TableSource(str(scalar_file), feature_prefix="pheno_embedding")
    assert scalar.feature_names() == source.feature_names()
    np.testing.assert_array_equal(source.read_features(np.array([5, 1, 5])), values[[5, 1, 5]])
    assert list(source.read_metadata().columns) == ["smiles", "extra"]


def test_list_and_scalar_columns_mix_and_predict_aligns_them_by_name(tmp_path):
    scalar_file, vector_file, values = embedding_tables(tmp_path)
    mixed = TableSource(str(vector_file), feature_regex=r"^(extra|pheno_embedding)$")
    assert mixed.feature_names() == ["extra", *[f"pheno_embedding[{j}]" for j in range(6)]]
    # a model trained on the list column reads the scalar-column file (and the reverse) by feature name
    described = mixed.describe()["init_args"]
    again = TableSource(str(scalar_file), **{k: v for k, v in described.items() if k != "path"})
    expected = np.column_stack([pq.read_table(scalar_file)["extra"].to_numpy(), values])
    np.testing.assert_array_equal(again.read_features(), expected)
    aligned = TableSource(str(vector_file), features=["pheno_embedding"]).read_features(
        align_to=["pheno_embedding[3]", "pheno_embedding[0]"])
    np.testing.assert_array_equal(aligned, values[:, [3, 0]])


@pytest.mark.parametrize("damage, message", [
    ("lengths", r"vector\.parquet: column 'pheno_embedding' holds lists of different lengths \(6 in most rows; "
                r"e\.g\. row 3: 5\)"),
    ("null", r"vector\.parquet: column 'pheno_embedding' has no list in 1 rows \(e\.g\. rows \[7\]\)"),
    ("text", r"vector\.parquet: feature columns must be numeric or lists of numbers.*pheno_embedding \(list<"),
    ("null element", r"vector\.parquet: 1 NaN or infinite feature values .*row 2 / pheno_embedding\[4\]"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_bad_list_columns_are_named_with_their_rows(tmp_path, damage, message, streaming):
    _, vector_file, values = embedding_tables(tmp_path)
    rows = [list(map(float, v)) for v in values]
    kind = pa.list_(pa.float32())
    if damage == "lengths":
        rows[3] = rows[3][:5]
    elif damage == "null":
        rows[7] = None
    elif damage == "text":
        rows, kind = [[str(x) for x in r] for r in rows], pa.list_(pa.string())
    else:
        rows[2][4] = None
    table = pq.read_table(vector_file).set_column(2, "pheno_embedding", pa.array(rows, type=kind))
    pq.write_table(table, vector_file)
    source = TableSource(str(vector_file), features=["pheno_embedding"] if damage != "text" else
                         [f"pheno_embedding[{j}]" for j in range(6)])
    with pytest.raises(DataError, match=message):
        if streaming:
            from unimodality.streaming import table_cache

            table_cache(source, tmp_path / "cache")
        else:
            source.read_features()


def test_streaming_reads_list_columns_as_in_memory(tmp_path):
    from unimodality.streaming import open_store

    _, vector_file, values = embedding_tables(tmp_path, n=300)
    source = TableSource(str(vector_file), features=["pheno_embedding"])
    store = open_store(source, tmp_path / "cache")
    np.testing.assert_array_equal(store.read_rows(np.arange(300)), values)


def test_the_lincs_plate_as_a_list_column_gives_the_scalar_columns_features(shared_data, tmp_path):
    plate = pd.read_csv(shared_data / "lincs_cellpainting_plate" / "SQ00015054_normalized_feature_select.csv.gz")
    features = [c for c in plate.columns if not c.startswith("Metadata_")]
    meta = plate[[c for c in plate.columns if c.startswith("Metadata_")]]
    plate.to_parquet(tmp_path / "scalar.parquet")
    vectors = pa.array(list(plate[features].to_numpy(np.float64)), type=pa.list_(pa.float64()))
    pq.write_table(pa.Table.from_pandas(meta, preserve_index=False).append_column("pheno_embedding", vectors),
                   tmp_path / "vector.parquet")
    scalar = TableSource(str(tmp_path / "scalar.parquet"), feature_regex="^(?!Metadata_)")
    vector = TableSource(str(tmp_path / "vector.parquet"), features=["pheno_embedding"])
    assert len(vector.feature_names()) == len(features) == 454
    np.testing.assert_array_equal(vector.read_features(), scalar.read_features())
    pd.testing.assert_frame_equal(vector.read_metadata(), scalar.read_metadata())


# -- sharded tables: a folder of parquet files read as one -----------------------------------------------------

def test_a_folder_of_parquet_files_reads_as_the_single_file(tmp_path, example_data_dir):
    from unimodality.paths import resolve_path
    from unimodality.streaming import open_store

    table = pq.read_table(resolve_path("example://phenomics.parquet"))
    pq.write_table(table, tmp_path / "single.parquet")
    folder = tmp_path / "shards"
    folder.mkdir()
    bounds = np.linspace(0, table.num_rows, 9).astype(int)
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(start, stop - start), folder / f"part-{i:02d}.parquet")
    single = TableSource(str(tmp_path / "single.parquet"), feature_prefix="feat_")
    sharded = TableSource(str(folder), feature_prefix="feat_")
    assert source_for(folder) is TableSource and sharded.num_rows() == single.num_rows()
    np.testing.assert_array_equal(sharded.read_features(), single.read_features())
    rows = np.array([5, 900, 3, 2000])
    np.testing.assert_array_equal(sharded.read_features(rows), single.read_features(rows))
    pd.testing.assert_frame_equal(sharded.read_metadata(), single.read_metadata())
    # streaming: the cache of the folder is the single file's
    np.testing.assert_array_equal(open_store(sharded, tmp_path / "c1").read_rows(np.arange(single.num_rows())),
                                  open_store(single, tmp_path / "c2").read_rows(np.arange(single.num_rows())))


def test_hive_partitions_become_metadata_columns(tmp_path):
    for plate in ("P1", "P2"):
        (tmp_path / f"plate={plate}").mkdir()
        pq.write_table(pa.table({"well": ["A1", "A2"], "f0": [1.0, 2.0], "f1": [3.0, 4.0]}),
                       tmp_path / f"plate={plate}" / "part-0.parquet")
    source = TableSource(str(tmp_path), feature_prefix="f")
    assert source.read_metadata()["plate"].tolist() == ["P1", "P1", "P2", "P2"]
    assert source.read_features().shape == (4, 2)


def test_shards_with_different_columns_are_named(tmp_path):
    pq.write_table(pa.table({"well": ["A1"], "f0": [1.0]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"well": ["A2"], "f9": [1.0]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: its columns differ from those of .*a\.parquet "
                                         r"\(e\.g\. \['f0', 'f9'\]"):
        TableSource(str(tmp_path), feature_prefix="f").read_features()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: a folder with no \.parquet file"):
        TableSource(str(empty), feature_prefix="f").read_features()


# -- zarr AnnData stores -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_a_zarr_store_reads_like_the_h5ad(tmp_path, kind):
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, size=(30, 12)).astype(np.float32)
    adata = ad.AnnData(X=X if kind == "dense" else sp.csr_matrix(X),
                       obs=pd.DataFrame({"sample": [f"s{i % 5}" for i in range(30)]},
                                        index=[f"c{i}" for i in range(30)]))
    adata.var_names = [f"g{j}" for j in range(12)]
    adata.obsm["emb"] = rng.normal(size=(30, 4)).astype(np.float32)
    adata.write_h5ad(tmp_path / "a.h5ad")
    adata.write_zarr(tmp_path / "a.zarr")
    for options in ({"transform": "log1p"}, {"obsm": "emb"}):
        h5ad = AnnDataSource(str(tmp_path / "a.h5ad"), **options)
        zarr_ = AnnDataSource(str(tmp_path / "a.zarr"), **options)
        assert source_for(tmp_path / "a.zarr") is AnnDataSource
        assert zarr_.feature_names() == h5ad.feature_names() and zarr_.num_rows() == 30
        rows = np.array([7, 2, 7, 29])
        for r in (None, rows):
            a, b = h5ad.read_features(r), zarr_.read_features(r)
            np.testing.assert_array_equal(a.toarray() if sp.issparse(a) else a, b.toarray() if sp.issparse(b) else b)
        pd.testing.assert_frame_equal(zarr_.read_metadata(["sample", "obs_names"]),
                                      h5ad.read_metadata(["sample", "obs_names"]))
        # streaming reads the store in place, range by range, like the .h5ad
        runs = (np.array([0, 5, 20]), np.array([3, 11, 30]))
        a, b = h5ad.row_store().read_runs(*runs), zarr_.row_store().read_runs(*runs)
        np.testing.assert_array_equal(a.toarray() if sp.issparse(a) else a, b.toarray() if sp.issparse(b) else b)
