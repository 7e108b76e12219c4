"""OUT's Parquet folders hold Parquet only, so dataset readers (pandas, DuckDB, Ray Data, `datasets`: all read a
folder through a Parquet dataset) open them; older outputs with tars beside their rows stay readable."""

import pyarrow as pa
import pyarrow.dataset as ds

from shardlight.core.layout import augmented_path
from shardlight.core.storage import write_atomic
from tests.index_helpers import clustered, write_shard


def test_generated_images_live_outside_the_parquet_folder(tmp_path):
    out = str(tmp_path / "out")
    write_shard(out, "00000", clustered(4, dim=8))
    write_shard(out, "00000", clustered(3, dim=8), folder="augmented", key_prefix="gen")
    tar = augmented_path(out, "00000", "tar")
    assert tar == f"{out}/augmented_images/00000.tar"
    write_atomic(tar, b"\0" * 1024)  # stands for the WebDataset tar the augmenter writes
    for folder, rows in (("embeddings", 4), ("augmented", 3)):
        table = ds.dataset(f"{out}/{folder}", format="parquet").to_table()  # what pd.read_parquet(folder) does
        assert table.num_rows == rows
        assert pa.types.is_fixed_size_list(table.schema.field("image_embedding").type)  # (n, dim) for Arrow readers


def test_an_older_output_with_tars_beside_the_rows_is_still_read(tmp_path):
    old = tmp_path / "out" / "augmented" / "00000.tar"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"")
    assert augmented_path(str(tmp_path / "out"), "00000", "tar") == str(old)
