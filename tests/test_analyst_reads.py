"""An output as analysts read it: the snippets of docs/reading-outputs.md (pyarrow, pandas, DuckDB, `datasets`,
Ray Data), run as written against a real `shardlight run` output, read input and generated rows as one table;
the Parquet folders hold Parquet only; older outputs with tars beside their rows stay readable."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from shardlight.core.layout import augmented_path
from shardlight.core.storage import write_atomic
from tests.index_helpers import clustered, write_shard

DOC = Path(__file__).resolve().parent.parent / "docs" / "reading-outputs.md"


def doc_snippets() -> dict[str, str]:
    """The doc's python blocks by the heading above them."""
    found, heading = {}, None
    for part in re.split(r"^```(?:python)?\n", DOC.read_text(), flags=re.M):
        for line in part.splitlines():
            if line.startswith("## "):
                heading = line[3:].strip()
        if part.lstrip().startswith(("import", "from")):
            found[heading] = part
    return found


SNIPPETS = doc_snippets()


def test_the_doc_has_one_snippet_per_reader():
    assert list(SNIPPETS) == ["pyarrow", "pandas", "DuckDB", "Hugging Face `datasets`", "Ray Data"]


@pytest.fixture(scope="module")
def ray_local():
    """Ray Data starts Ray on first use; a local one sized for the machine, closed after the module."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("reader", list(SNIPPETS))
def test_documented_snippet_reads_input_and_generated_rows_as_one_table(reader, augmented_cli_run, tmp_path,
                                                                      monkeypatch, request):
    out, _ = augmented_cli_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # not the user's cache
    if reader == "Ray Data":
        request.getfixturevalue("ray_local")
    real = pq.read_table(out / "embeddings")
    generated = pq.read_table(out / "augmented")
    assert real.num_rows and generated.num_rows and real.schema.equals(generated.schema)  # one schema
    namespace: dict = {}
    exec(SNIPPETS[reader].replace("OUT/", f"{out}/"), namespace)  # noqa: S102 - the documented code, as written
    vectors = namespace["vectors"]
    assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32
    assert vectors.shape == (real.num_rows + generated.num_rows, real.schema.field("image_embedding").type.list_size)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    expected = [v.tobytes() for table in (real, generated)
                for v in np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False))]
    assert sorted(v.tobytes() for v in vectors) == sorted(expected)  # every row's vector, input and generated
    if reader == "DuckDB":
        first_key = min(real.column("key").to_pylist() + generated.column("key").to_pylist())
        nearest = namespace["nearest"]
        assert nearest[0][0] == first_key and nearest[0][2] == pytest.approx(1.0, abs=1e-5) and len(nearest) == 5
    if reader == "pandas":
        assert len(namespace["generated"]) == generated.num_rows


def test_generated_images_live_outside_the_parquet_folder(tmp_path):
    out = str(tmp_path / "out")
    write_shard(out, "00000", clustered(4, dim=8))
    write_shard(out, "00000", clustered(3, dim=8), folder="augmented", key_prefix="gen", synthetic=[True] * 3)
    tar = augmented_path(out, "00000", "tar")
    assert tar == f"{out}/augmented_images/00000.tar"
    write_atomic(tar, b"\0" * 1024)  # stands for the WebDataset tar the augmenter writes
    for folder, rows in (("embeddings", 4), ("augmented", 3)):
        table = ds.dataset(f"{out}/{folder}", format="parquet").to_table()  # what pd.read_parquet(folder) does
        assert table.num_rows == rows
        assert pa.types.is_fixed_size_list(table.schema.field("image_embedding").type)  # (n, dim) for Arrow readers
    both = ds.dataset([ds.dataset(f"{out}/embeddings"), ds.dataset(f"{out}/augmented")]).to_table()
    assert both.column("synthetic").to_pylist() == [False] * 4 + [True] * 3


def test_an_older_output_with_tars_beside_the_rows_is_still_read(tmp_path):
    old = tmp_path / "out" / "augmented" / "00000.tar"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"")
    assert augmented_path(str(tmp_path / "out"), "00000", "tar") == str(old)

